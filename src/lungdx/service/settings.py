"""Service settings: one frozen dataclass, filled by ``lungdx serve`` (the only place that reads argv or env)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lungdx.io.acceptance import DEFAULT_MAX_PIXELS


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (which a container's cpuset narrows), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ServiceSettings:
    """What the service needs to start.

    Attributes:
        run: a run folder (its ``model.pt``) or a checkpoint file.
        api_key: required in the ``X-API-Key`` header of every ``/v1`` request when set (kept out of ``repr``).
        db_url: SQLAlchemy URL of the prediction and feedback log; None disables monitoring.
        precision: ``checkpoint`` (the precision the threshold was chosen in, ``numeric_precision`` in ``model.pt``),
            so that the decision is the one validated; ``auto``/``bf16`` are faster on some machines but move
            probabilities slightly and may flip decisions near the threshold (``lungdx.predict.Predictor``).
        max_upload_bytes: larger request bodies get 413 before they are read to the end.
        max_pixels: images with more pixels (rows x columns, read from the header before decoding) get 413;
            the same default as every other entrance (``lungdx.io.acceptance.DEFAULT_MAX_PIXELS``).
        allow_non_chest: score DICOM images whose header says not CR/DX, not chest or not PA/AP, with a
            warning in the response, instead of refusing them (422); for research only.
        max_batch: the most concurrent requests run through the model as one batch (1 turns batching off).
        max_wait_ms: how long the first request of a batch waits for others to join it.
        max_decodes: the most uploads decoded and levelled at once, each in a thread of its own pool (a 50-megapixel
            16-bit RGB PNG peaks at about 1.7 GB while it decodes); default: the CPUs this process may use.
        decode_wait_s: how long an upload waits for a decoding slot before it is answered 503 with Retry-After.
        max_queue: the most levelled images waiting for the model; one more is answered 503 with Retry-After.
        heatmap_method: ``auto`` (the model's own nodule map for a localising model such as nodule_net,
            Grad-CAM otherwise), ``gradcam``, ``occlusion`` or ``nodule_map``, for ``?heatmap=true``.
        preview_px: the longer side of the radiograph preview returned to the web page.
        archive_dir: with monitoring on, keep each image's pixels here for ``lungdx monitor export``
            and ``challenge`` (see ``lungdx.monitoring.MonitorSettings``).
        webhook_url: with monitoring on, POST alerts here.
    """

    run: Path
    api_key: str | None = field(default=None, repr=False)
    db_url: str | None = "sqlite:///monitor.db"
    device: str = "auto"
    precision: str = "checkpoint"
    max_upload_bytes: int = 64 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_non_chest: bool = False
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_decodes: int = field(default_factory=usable_cpus)
    decode_wait_s: float = 5.0
    max_queue: int = 16
    heatmap_method: str = "auto"
    preview_px: int = 768
    archive_dir: Path | None = None
    webhook_url: str | None = None

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {self.max_wait_ms}")
        if self.max_decodes < 1 or self.max_queue < 1:
            raise ValueError(f"max_decodes and max_queue must be at least 1, got {self.max_decodes} and {self.max_queue}")
        if not self.decode_wait_s >= 0:  # also refuses NaN
            raise ValueError(f"decode_wait_s must not be negative, got {self.decode_wait_s}")
        if self.max_upload_bytes < 1024 or self.max_pixels < 4:
            raise ValueError("max_upload_bytes must be at least 1 KiB and max_pixels at least 4")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ValueError("an API key must be at least 16 characters long")
        if self.db_url:
            _check_database_url(self.db_url)


def _check_database_url(url: str) -> None:
    """A clear error at once for a URL SQLAlchemy cannot read, an in-memory SQLite or a SQLite file in a missing folder."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from lungdx.monitoring.store import refuse_in_memory

    try:
        parsed = make_url(url)
    except ArgumentError as err:
        # Unreadable, so its password cannot be hidden by SQLAlchemy: whatever lies between '//' and '@' is cut
        shown = re.sub(r"//[^/]*@", "//***@", url)
        raise ValueError(f"cannot read the database URL {shown!r}: {err} (e.g. sqlite:///monitor.db)") from err
    refuse_in_memory(parsed)
    if parsed.get_backend_name() == "sqlite":
        folder = Path(parsed.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise ValueError(f"{folder}: no such folder for the SQLite database {parsed.database}")
