"""The paper's CNN: five 3x3 convolutions (stride 1, ReLU, 2x2 max-pooling), two fully connected
layers with dropout 0.5, and one logit (sigmoid at inference)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from lungdx.models.registry import register_model


class PaperCNN(nn.Module):
    """Five conv blocks and two fully connected layers.

    Args:
        input_size: height and width of the (square) input; fixes the flattened feature size.
        in_channels: input channels (1 for radiographs).
        widths: output channels of the five conv layers.
        hidden: units of the first fully connected layer.
        dropout: dropout before each fully connected layer.
        batch_norm: add batch normalisation after each convolution (not in the paper; off).
    """

    gradcam_layer = "features.block5.relu"
    head_prefix = "classifier"  # both fully connected layers train while the convolutions are frozen

    def __init__(
        self,
        input_size: int = 256,
        in_channels: int = 1,
        widths: tuple[int, ...] = (32, 64, 128, 256, 256),
        hidden: int = 256,
        dropout: float = 0.5,
        batch_norm: bool = False,
    ):
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"paper_cnn has five conv layers; got widths {tuple(widths)}")
        if input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32 (five 2x2 poolings); got {input_size}")
        self.input_size = input_size
        self.in_channels = in_channels
        blocks, channels = [], in_channels
        for index, width in enumerate(widths, start=1):
            blocks.append((f"block{index}", _conv_block(channels, width, batch_norm)))
            channels = width
        self.features = nn.Sequential(OrderedDict(blocks))
        flat = channels * (input_size // 32) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(flat, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.input_size, self.input_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"paper_cnn expects input of shape (N, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        return self.classifier(self.features(images))


def _conv_block(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    layers = [("conv", nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=not batch_norm))]
    if batch_norm:
        layers.append(("bn", nn.BatchNorm2d(out_channels)))
    layers += [("relu", nn.ReLU(inplace=False)), ("pool", nn.MaxPool2d(2))]
    return nn.Sequential(OrderedDict(layers))


@register_model
def paper_cnn(**kwargs) -> PaperCNN:
    """The paper's five-layer CNN (default widths 32-64-128-256-256, hidden FC 256)."""
    if "widths" in kwargs:
        kwargs["widths"] = tuple(kwargs["widths"])
    return PaperCNN(**kwargs)
