"""Self-describing checkpoints, loaded without executing pickled code.

A checkpoint holds the weights and everything needed to predict with them: model name and
arguments, preprocessing, task and class names, operating threshold (chosen on validation),
a fingerprint of the training data, validation metrics and library versions. Everything is
plain Python data or tensors, so ``torch.load(..., weights_only=True)`` reads it.
"""

from __future__ import annotations

import io
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lungdx.io.files import write_atomic
from lungdx.models import create_model

FORMAT = "lungdx-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and the problem."""


def versions() -> dict[str, str]:
    """Versions of the software that made a result."""
    import numpy

    from lungdx import __version__

    return {"lungdx": __version__, "torch": str(torch.__version__), "numpy": numpy.__version__,
            "python": platform.python_version()}


def save_checkpoint(path: str | Path, model: nn.Module, *, model_name: str, model_kwargs: dict[str, Any],
                    preprocess: dict[str, Any], task: str, class_names: list[str], threshold: float | None,
                    **info: Any) -> None:
    """Write the weights and their description to ``path`` (atomically).

    Args:
        info: more plain-data fields, e.g. ``threshold_method``, ``data_fingerprint``,
            ``val_metrics``, ``epoch``.
    """
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    payload = {"format": FORMAT, "model": {"name": model_name, "kwargs": dict(model_kwargs)},
               "state_dict": state, "preprocess": dict(preprocess), "task": task,
               "class_names": list(class_names), "threshold": threshold, "versions": versions(), **info}
    write_checkpoint(path, payload)


def write_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a loaded (possibly updated) checkpoint back, atomically: a crash never leaves half a file."""
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: refusing to write a payload that is not a lungdx checkpoint")
    save_atomic(payload, path)


def save_atomic(payload: Any, path: str | Path) -> None:
    """``torch.save`` through a uniquely named temporary file, fsync and a rename: a crash or a power cut never
    leaves half a file under ``path``, and two writers never share a temporary file."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check that it is a lungdx checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a lungdx checkpoint (expected format {FORMAT})")
    return payload


def model_from_checkpoint(payload: dict[str, Any]) -> nn.Module:
    """Build the model a checkpoint describes and load its weights (evaluation mode, CPU)."""
    model = create_model(payload["model"]["name"], **payload["model"]["kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def model_version(payload: dict[str, Any]) -> str:
    """A short, stable fingerprint of a checkpoint's model: architecture, weights, preprocessing, threshold.

    Two checkpoints that would give different answers get different versions; the same
    checkpoint loaded twice gets the same one. Used wherever a result names its model
    (service responses, DICOM SR, FHIR, the prediction log).
    """
    import hashlib
    import json

    digest = hashlib.sha256()
    described = {key: payload.get(key) for key in ("model", "preprocess", "task", "class_names", "threshold", "temperature")}
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for name in sorted(payload["state_dict"]):
        tensor = payload["state_dict"][name]
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def model_identity(payload: dict[str, Any]) -> dict[str, str]:
    """Name and version of the model behind a result, as IHE AI Results and FHIR ask for them."""
    from lungdx import __version__

    return {"name": f"lungdx {payload['model']['name']}", "model": payload["model"]["name"],
            "version": model_version(payload), "software_version": __version__, "task": payload.get("task", "")}
