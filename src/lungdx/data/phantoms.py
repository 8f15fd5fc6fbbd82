"""Seeded synthetic chest phantoms: the built-in data of ``lungdx demo`` and of fast tests.

A phantom is a posteroanterior (PA) chest radiograph drawn from simple shapes, displayed in
MONOCHROME2 polarity (DICOM PS3.3 C.7.6.3.1.2: bone and soft tissue bright, aerated lung dark).
The patient's left is on the image's right, so the heart shadow bulges to the image's right.
Each phantom has a body outline, two lung fields, mediastinum, heart and aortic knob, spine,
clavicles, posterior and anterior ribs, diaphragm domes, hilar vessels, low-frequency exposure
variation and quantum-like noise. At most one nodule lies inside a lung field:

- ``benign``: 5-15 mm, smooth and round; about 30 % calcified (a dense core).
- ``malignant``: 10-35 mm, lobulated or spiculated.
- ``non_nodule``: no nodule.

Sizes overlap between the classes and contrast varies (it grows with the diameter, as the
projected thickness does; subtle nodules included), so the task is learnable but not trivial.
Everything is drawn in *patient coordinates* (the unit square, 1 unit = 360 mm, like JSRT's
2048 x 0.175 mm) and sampled through a *view* (small rotation, zoom, shift, exposure); a second
image of the same patient re-renders the same anatomy through another view.

Nothing learnt or measured on phantoms says anything about real radiographs.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

KINDS = ("non_nodule", "benign", "malignant")
FIELD_OF_VIEW_MM = 360.0
"""Width of the (unrotated, unzoomed) image in mm: JSRT's 2048 px x 0.175 mm."""
SECOND_VIEW_FRACTION = 0.1
"""About this fraction of patients get a second image (exercises patient-level splits)."""
LABEL_COLUMNS = (
    "image", "case_id", "label", "has_nodule", "malignant", "subtlety", "size_mm", "age", "sex",
    "nodule_x_2048", "nodule_y_2048", "nodule_x", "nodule_y", "nodule_radius_px", "location",
    "diagnosis", "source_split", "lung_mask", "patient_id", "synthetic",
)
"""The JSRT ``labels.csv`` layout plus ``patient_id`` and ``synthetic``."""
_SUBTLETY_EDGES = (0.082, 0.128, 0.216, 0.35)
"""Conspicuity thresholds between subtlety 1|2|3|4|5 (see ``_subtlety``)."""


@dataclass(frozen=True)
class Lung:
    """One lung field; ``d`` is the distance from the midline, outward, in patient units."""

    apex_v: float
    base_v: float
    medial: float
    medial_slope: float
    width: float
    apex_frac: float
    t_full: float
    dome_h: float
    wobble: tuple[float, float, float]


@dataclass(frozen=True)
class Nodule:
    """A nodule in patient coordinates.

    ``contrast`` is the peak added density (attenuation units); ``lobes`` holds (order,
    relative amplitude, phase) of the margin's harmonics; ``spicules`` (angle, length in radii,
    relative width); ``side`` is the patient's side (``r``/``l``) and ``zone`` upper/middle/lower.
    """

    u: float
    v: float
    size_mm: float
    contrast: float
    calcified: bool
    core_ratio: float
    core_contrast: float
    margin: str
    lobes: tuple[tuple[int, float, float], ...]
    spicules: tuple[tuple[float, float, float], ...]
    side: str
    zone: str


@dataclass(frozen=True)
class Anatomy:
    """Everything that stays the same between two images of one patient.

    Lengths are in patient units (1 = 360 mm), ``u`` to the image's right, ``v`` down. Tuples:
    ``heart`` (u, v, long radius, short radius, tilt in rad); ``knob`` (u, v, radius) of the
    aortic knob; ``ribs`` (lateral offset of the arch's top, curvature, first rib v, spacing,
    band fraction of a period, anterior-rib weight); ``clavicle`` (v at the sternal end, slope,
    curvature); ``bubble`` (u, v, radii) of the stomach gas. ``air``, ``bone`` and ``breast``
    weight those tissues; ``vessels`` and ``texture`` are the random fields of the lung markings.
    """

    kind: str
    age: int
    sex: str
    body_hw: float
    neck_hw: float
    shoulder_v: float
    lungs: tuple[Lung, Lung]
    heart: tuple[float, float, float, float, float]
    knob: tuple[float, float, float]
    ribs: tuple[float, float, float, float, float, float]
    clavicle: tuple[float, float, float]
    spine_hw: float
    air: float
    bone: float
    breast: float
    bubble: tuple[float, float, float, float] | None
    vessels: np.ndarray = field(repr=False)
    texture: np.ndarray = field(repr=False)
    nodule: Nodule | None = None


@dataclass(frozen=True)
class View:
    """How one image samples the patient: geometry, exposure and noise."""

    angle: float
    scale: float
    shift_u: float
    shift_v: float
    gain: float
    bend: float
    floor: float
    noise: float
    shading: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Phantom:
    """A rendered phantom: ``image`` float32 (H, W) in [0, 1], JSON-able ``info`` and masks."""

    image: np.ndarray
    info: dict
    lung_mask: np.ndarray
    nodule_mask: np.ndarray


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def make_phantom(rng: np.random.Generator, size: int = 256, kind: str = "non_nodule") -> tuple[np.ndarray, dict]:
    """Draw one synthetic PA chest phantom.

    Args:
        rng: Source of all randomness; the same generator state gives the same phantom.
        size: Output height and width in pixels.
        kind: ``"non_nodule"``, ``"benign"`` or ``"malignant"``.

    Returns:
        float32 ``(size, size)`` pixels in [0, 1] (MONOCHROME2) and an info dict with ``kind``,
        ``has_nodule``, ``malignant`` (None without nodule), ``nodule_x``, ``nodule_y``
        (column, row of the centre in pixels), ``nodule_radius_px``, ``size_mm``, ``subtlety``,
        ``calcified``, ``margin`` (nodule fields None without nodule), plus ``age``, ``sex``,
        ``location`` and ``pixel_spacing_mm``.
    """
    phantom = generate_phantom(rng, size, kind)
    return phantom.image, phantom.info


def generate_phantom(rng: np.random.Generator, size: int = 256, kind: str = "non_nodule") -> Phantom:
    """Like ``make_phantom`` but also return the lung-field and nodule masks."""
    anatomy = sample_anatomy(rng, kind)
    return render(anatomy, sample_view(rng), size, rng)


def sample_anatomy(rng: np.random.Generator, kind: str) -> Anatomy:
    """Draw a patient: body, lungs, heart, bones, vessels and (for nodule kinds) a nodule."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    anatomy = _sample_body(rng, kind)
    if kind == "non_nodule":
        return anatomy
    return dataclasses.replace(anatomy, nodule=_sample_nodule(rng, anatomy, malignant=kind == "malignant"))


def sample_view(rng: np.random.Generator) -> View:
    """Draw a view: a few degrees of rotation, a few % of zoom and shift, exposure and noise."""
    return View(
        angle=float(rng.uniform(-0.05, 0.05)), scale=float(rng.uniform(0.95, 1.05)),
        shift_u=float(rng.uniform(-0.025, 0.025)), shift_v=float(rng.uniform(-0.03, 0.03)),
        gain=float(rng.uniform(1.6, 2.1)), bend=float(rng.uniform(-0.25, 0.15)),
        floor=float(rng.uniform(0.12, 0.28)), noise=float(rng.uniform(0.005, 0.013)),
        shading=rng.normal(0.0, 1.0, (4, 4)).astype(np.float32),
    )


def render(anatomy: Anatomy, view: View, size: int, rng: np.random.Generator) -> Phantom:
    """Project ``anatomy`` through ``view`` onto a ``size`` x ``size`` image (noise from ``rng``)."""
    # Anatomy is smooth: draw it at up to half resolution and upsample; nodule and noise at full.
    work = size if size <= 160 else (size + 1) // 2
    u, v = _grid(view, work)
    lung_mask = _lung_mask(anatomy, u, v)
    attenuation = _attenuation(anatomy, view, u, v, lung_mask)
    if work != size:
        attenuation = _resize(attenuation, size)
        lung_mask = _resize(lung_mask.astype(np.float32), size) > 0.5
    nodule_mask = np.zeros((size, size), dtype=bool)
    centre, radius_px = None, None
    if anatomy.nodule is not None:
        centre, radius_px = _nodule_pixel_geometry(anatomy.nodule, view, size)
        _add_nodule(attenuation, nodule_mask, anatomy.nodule, centre, radius_px, view.angle)
    image = _expose(attenuation, view, size, rng)
    info = _info(anatomy, size, centre, radius_px)
    return Phantom(image=image, info=info, lung_mask=lung_mask, nodule_mask=nodule_mask)


def write_phantom_dataset(
    out_dir: str | Path,
    n_images: int = 600,
    *,
    size: int = 256,
    seed: int = 0,
    fractions: Sequence[float] = (0.4, 0.2, 0.4),
    bits: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a phantom data set in the JSRT ``labels.csv`` layout.

    Writes ``out_dir/images/PHANTnnnn.png`` (grayscale, 16- or 8-bit), ``out_dir/lung_masks/``
    (uint8 {0, 1}, like the JSRT masks), ``out_dir/labels.csv`` (``LABEL_COLUMNS``) and
    ``out_dir/README.md``. About 10 % of patients get a second image of the same class from
    another view. The same arguments give byte-identical files.

    Args:
        out_dir: Folder to create or fill.
        n_images: Number of images (not patients).
        size: Image height and width in pixels.
        seed: Seed of everything.
        fractions: Fractions of (malignant, benign, non_nodule) images; must sum to 1.
        bits: 16 or 8 bits per pixel.
        progress: Called as ``progress(i, n_images)`` after the i-th image (1-based).

    Returns:
        Path of ``labels.csv``.
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    counts = _class_counts(n_images, fractions)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "lung_masks").mkdir(parents=True, exist_ok=True)
    plan = _patient_plan(counts, np.random.default_rng([seed, 1]))
    seeds = np.random.SeedSequence([seed, 2]).spawn(len(plan))
    rows = []
    for number, ((kind, n_views), seed_seq) in enumerate(zip(plan, seeds, strict=True), start=1):
        rows += _write_patient(out_dir, kind, n_views, f"SYN{number:05d}", seed_seq, len(rows), size, bits)
        if progress is not None:
            for index in range(len(rows) - n_views, len(rows)):
                progress(index + 1, n_images)
    labels_path = out_dir / "labels.csv"
    with labels_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "README.md").write_text(_readme(rows, seed, size, bits), encoding="utf-8")
    logger.info("wrote %d synthetic phantoms (%d patients) to %s", len(rows), len(plan), out_dir)
    return labels_path


# --------------------------------------------------------------------------------------------
# Anatomy sampling
# --------------------------------------------------------------------------------------------


def _sample_lung(rng: np.random.Generator, base_shift: float) -> Lung:
    return Lung(
        apex_v=float(rng.uniform(0.07, 0.12)), base_v=float(rng.uniform(0.73, 0.82) + base_shift),
        medial=float(rng.uniform(0.045, 0.065)), medial_slope=float(rng.uniform(0.01, 0.05)),
        width=float(rng.uniform(0.29, 0.36)), apex_frac=float(rng.uniform(0.3, 0.45)),
        t_full=float(rng.uniform(0.45, 0.62)), dome_h=float(rng.uniform(0.04, 0.09)),
        wobble=(float(rng.uniform(0.0, 0.015)), float(rng.uniform(1.0, 2.5)), float(rng.uniform(0, 2 * np.pi))),
    )


def _sample_body(rng: np.random.Generator, kind: str) -> Anatomy:
    sex = "female" if rng.random() < 0.5 else "male"
    mean_age = {"malignant": 62, "benign": 56, "non_nodule": 50}[kind]
    heart_u = float(rng.uniform(0.56, 0.59))
    lungs = (_sample_lung(rng, 0.0), _sample_lung(rng, float(rng.uniform(0.0, 0.035))))
    knob_v = float(rng.uniform(0.31, 0.36))
    left = lungs[1]  # the aortic knob indents the patient's left lung, on the image's right
    knob_u = 0.5 + left.medial + left.medial_slope * (knob_v - left.apex_v) / (left.base_v - left.apex_v)
    bubble = None
    if rng.random() < 0.5:
        bubble = (float(heart_u + rng.uniform(0.12, 0.2)), float(rng.uniform(0.80, 0.86)),
                  float(rng.uniform(0.03, 0.06)), float(rng.uniform(0.02, 0.035)))
    return Anatomy(
        kind=kind, age=int(np.clip(rng.normal(mean_age, 12), 20, 90)), sex=sex,
        body_hw=float(rng.uniform(0.46, 0.54)), neck_hw=float(rng.uniform(0.09, 0.12)),
        shoulder_v=float(rng.uniform(-0.06, 0.02)),
        lungs=lungs,
        heart=(heart_u, float(rng.uniform(0.62, 0.66)), float(rng.uniform(0.17, 0.2)),
               float(rng.uniform(0.115, 0.135)), float(rng.uniform(0.25, 0.45))),
        knob=(knob_u + float(rng.uniform(-0.005, 0.012)), knob_v, float(rng.uniform(0.028, 0.04))),
        ribs=(float(rng.uniform(0.08, 0.14)), float(rng.uniform(2.4, 3.4)), float(rng.uniform(0.05, 0.08)),
              float(rng.uniform(0.066, 0.078)), float(rng.uniform(0.34, 0.42)), float(rng.uniform(0.3, 0.6))),
        clavicle=(float(rng.uniform(0.19, 0.24)), float(rng.uniform(0.45, 0.65)), float(rng.uniform(0.5, 0.9))),
        spine_hw=float(rng.uniform(0.03, 0.04)), air=float(rng.uniform(0.52, 0.66)),
        bone=float(rng.uniform(0.035, 0.065)), breast=float(rng.uniform(0.05, 0.12)) if sex == "female" else 0.0,
        bubble=bubble, vessels=rng.normal(0.0, 1.0, (2, 10, 160)).astype(np.float32),
        texture=rng.normal(0.0, 1.0, (64, 64)).astype(np.float32),
    )


def _sample_nodule(rng: np.random.Generator, anatomy: Anatomy, malignant: bool) -> Nodule:
    if malignant:
        size_mm = float(np.clip(rng.lognormal(np.log(21.0), 0.3), 10.0, 35.0))
        margin = "spiculated" if rng.random() < 0.5 else "lobulated"
        calcified = False
    else:
        size_mm = float(np.clip(rng.lognormal(np.log(9.5), 0.3), 5.0, 15.0))
        margin, calcified = "smooth", bool(rng.random() < 0.3)
    lobe_scale = {"smooth": 0.03, "lobulated": 0.16, "spiculated": 0.08}[margin]
    lobes = tuple((k, float(rng.uniform(0.2, 1.0) * lobe_scale * 2.0 / k), float(rng.uniform(0, 2 * np.pi)))
                  for k in (2, 3, 4, 5))
    spicules = ()
    if margin == "spiculated":
        spicules = tuple((float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.5, 1.6)), float(rng.uniform(0.5, 1.0)))
                         for _ in range(int(rng.integers(6, 15))))
    u, v, side, zone = _nodule_position(rng, anatomy, size_mm / 2.0 / FIELD_OF_VIEW_MM)
    return Nodule(
        u=u, v=v, size_mm=round(size_mm, 1), contrast=_contrast(rng, size_mm), calcified=calcified,
        core_ratio=float(rng.uniform(0.35, 0.6)), core_contrast=float(rng.uniform(0.15, 0.35)) if calcified else 0.0,
        margin=margin, lobes=lobes, spicules=spicules, side=side, zone=zone,
    )


def _contrast(rng: np.random.Generator, size_mm: float) -> float:
    """Peak density: a random tissue density times the thickness, which grows with the diameter."""
    return float(rng.uniform(0.08, 0.36) * (size_mm / 20.0) ** 0.75)


def _nodule_position(rng: np.random.Generator, anatomy: Anatomy, radius: float) -> tuple[float, float, str, str]:
    """Rejection-sample a centre whose disc (shrunk to 60 %) lies inside a lung field."""
    angles = np.linspace(0.0, 2 * np.pi, 9)  # the last angle repeats the first: the centre itself
    margin = np.where(np.arange(9) < 8, max(0.6 * radius, 0.012), 0.0)
    for _ in range(20):
        u, v = rng.uniform(0.08, 0.92, (64, 1)), rng.uniform(0.1, 0.85, (64, 1))
        inside = _lung_mask(anatomy, u + margin * np.cos(angles), v + margin * np.sin(angles)).all(axis=1)
        if inside.any():
            u, v = u[inside.argmax(), 0], v[inside.argmax(), 0]
            break
    else:  # pragma: no cover - the lungs cover ~30 % of the square, so 1280 misses do not happen
        raise RuntimeError("could not place a nodule inside the lung fields")
    lung = anatomy.lungs[0] if u < 0.5 else anatomy.lungs[1]
    t = (v - lung.apex_v) / (lung.base_v - lung.apex_v)
    zone = "upper" if t < 0.4 else ("middle" if t < 0.65 and u < 0.5 else "lower")
    # PA view: the image's left is the patient's right.
    return float(u), float(v), ("r" if u < 0.5 else "l"), zone


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def _grid(view: View, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient coordinates (u, v) of every pixel centre."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    x, y = np.meshgrid(axis, axis)
    cos, sin = math.cos(view.angle) * view.scale, math.sin(view.angle) * view.scale
    u = 0.5 + view.shift_u + cos * x - sin * y
    v = 0.5 + view.shift_v + sin * x + cos * y
    return u, v


def _to_pixels(view: View, size: int, u: float, v: float) -> tuple[float, float]:
    """Inverse of ``_grid``: (column, row) in pixels of patient point (u, v)."""
    du, dv = (u - 0.5 - view.shift_u) / view.scale, (v - 0.5 - view.shift_v) / view.scale
    cos, sin = math.cos(view.angle), math.sin(view.angle)
    x, y = cos * du + sin * dv, -sin * du + cos * dv
    return (x + 0.5) * size - 0.5, (y + 0.5) * size - 0.5


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _one_lung(lung: Lung, d: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test for one lung: rounded apex, convex lateral wall, diaphragm dome below."""
    t = (v - lung.apex_v) / (lung.base_v - lung.apex_v)
    amp, freq, phase = lung.wobble
    lateral = lung.medial + lung.width * (1.0 + 0.08 * t) + amp * np.sin(freq * np.pi * t + phase)
    medial = lung.medial + lung.medial_slope * t
    apex = lung.medial + lung.apex_frac * lung.width
    s_lat = np.clip(t / lung.t_full, 0.0, 1.0)
    s_med = np.clip(t / (0.35 * lung.t_full), 0.0, 1.0)
    lateral = apex + (lateral - apex) * np.sqrt(1.0 - (1.0 - s_lat) ** 2)
    medial = apex - (apex - medial) * np.sqrt(1.0 - (1.0 - s_med) ** 2)
    q = (d - lung.medial - 0.45 * lung.width) / (0.55 * lung.width)
    dome = lung.base_v - lung.dome_h * np.clip(1.0 - q * q, 0.0, 1.0)
    return (t >= 0.0) & (d >= medial) & (d <= lateral) & (v <= dome)


def _in_heart(anatomy: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Ellipse level of the heart (< 1 inside); its lower half is stretched down onto the diaphragm."""
    hu, hv, ru, rv, angle = anatomy.heart
    cos, sin = math.cos(angle), math.sin(angle)
    du, dv = u - hu, v - hv
    across = (-sin * du + cos * dv) / rv
    across = np.where(across > 0, 0.5 * across, across)
    return ((cos * du + sin * dv) / ru) ** 2 + across ** 2


def _lung_mask(anatomy: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Lung fields (bool), minus the heart and the aortic knob."""
    right = _one_lung(anatomy.lungs[0], 0.5 - u, v) & (u < 0.5)
    left = _one_lung(anatomy.lungs[1], u - 0.5, v) & (u >= 0.5)
    ku, kv, kr = anatomy.knob
    outside = (_in_heart(anatomy, u, v) > 1.0) & ((u - ku) ** 2 + (v - kv) ** 2 > kr * kr)
    return (right | left) & outside


# --------------------------------------------------------------------------------------------
# Attenuation
# --------------------------------------------------------------------------------------------


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur; large kernels run on a downsampled copy (smooth anyway, much faster)."""
    if sigma_px < 0.3:
        return image
    size = image.shape[0]
    factor = max(1, int(sigma_px // 3))
    if factor == 1:
        return cv2.GaussianBlur(image, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)
    small = cv2.resize(image, (size // factor, size // factor), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma_px / factor, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


def _attenuation(anatomy: Anatomy, view: View, u: np.ndarray, v: np.ndarray, lung_mask: np.ndarray) -> np.ndarray:
    """Sum of tissue contributions (arbitrary units, ~0 = air, ~1 = mediastinum)."""
    size = u.shape[0]
    coarse = max(size // 2, 32)  # soft tissue and mediastinum have no sharp detail
    cu, cv = _grid(view, coarse)
    body = _resize(_soft_tissue(anatomy, cu, cv) + _mediastinum(anatomy, cu, cv), size)
    mask = lung_mask.astype(np.float32)
    lung = _blur(mask, 0.008 * size) * (0.35 + 0.65 * _blur(mask, 0.05 * size))
    lung *= 0.8 + 0.2 * _smoothstep((v - 0.1) / 0.25)  # apices lie under more soft tissue
    total = body - anatomy.air * lung
    total += anatomy.bone * _ribs(anatomy, u, v) * (0.5 + 0.5 * lung) + 0.16 * _clavicles(anatomy, u, v)
    total += (_vessels(anatomy, u, v) + _mottle(anatomy, u, v)) * lung
    return _blur(total.astype(np.float32), 0.0025 * size)


def _soft_tissue(anatomy: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Body outline (neck, shoulders, torso) with thickness falling towards its edges."""
    half_width = anatomy.neck_hw + (anatomy.body_hw - anatomy.neck_hw) * _smoothstep((v - anatomy.shoulder_v) / 0.22)
    across = np.clip(1.0 - ((u - 0.5) / half_width) ** 2, 0.0, 1.0)
    body = 0.68 * np.sqrt(across) + 0.12 * _smoothstep(across * 6.0)
    abdomen = 0.12 * _smoothstep((v - 0.75) / 0.2)
    total = body + abdomen * (across > 0)
    if anatomy.breast > 0:
        for side in (-1.0, 1.0):
            du, dv = (u - 0.5 - side * 0.25) / 0.16, (v - 0.72) / 0.12
            total += anatomy.breast * _smoothstep(1.0 - du * du - dv * dv) * (dv > -0.8)
    return total


def _mediastinum(anatomy: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Heart, aortic knob, spine, trachea, hila and the stomach bubble."""
    heart = 0.05 * _smoothstep((1.0 - _in_heart(anatomy, u, v)) * 2.0)
    across = np.abs(u - 0.5) / anatomy.spine_hw
    vertebrae = 0.7 + 0.3 * np.cos(2 * np.pi * v / 0.045) ** 2
    spine = 0.05 * _smoothstep((1.0 - across) * 1.5) * vertebrae
    trachea = -0.10 * _smoothstep((1.0 - np.abs(u - 0.5) / 0.024) * 2.0) * _smoothstep((0.36 - v) / 0.05)
    hila = sum(0.08 * np.exp(-(((u - 0.5 - s * 0.12) / 0.05) ** 2 + ((v - 0.44) / 0.08) ** 2)) for s in (-1, 1))
    total = heart + spine + trachea + hila
    if anatomy.bubble is not None:
        bu, bv, ru, rv = anatomy.bubble
        total -= 0.18 * _smoothstep((1.0 - ((u - bu) / ru) ** 2 - ((v - bv) / rv) ** 2) * 3.0)
    return total


def _ribs(anatomy: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Posterior ribs (arching out and down) and faint anterior ribs (down towards the midline)."""
    d_peak, curve, first, spacing, duty, anterior = anatomy.ribs
    d = np.abs(u - 0.5)
    cage = max(lung.medial + lung.width for lung in anatomy.lungs) + 0.03
    extent = _smoothstep((d - 0.03) / 0.02) * _smoothstep((cage - d) / 0.03)
    phase = (v - curve * ((d - d_peak) ** 2 - d_peak * d_peak) - first) / spacing
    posterior = _rib_profile(phase, duty) * (phase >= 0.0) * (phase < 10.5)
    front_phase = (v + 0.8 * d - first - 0.12) / (spacing * 1.15)
    front = _rib_profile(front_phase, duty * 0.8) * (front_phase >= 0.0) * (front_phase < 6.0)
    front *= _smoothstep((d - 0.12) / 0.06)
    return extent * (posterior + anterior * front)


def _rib_profile(phase: np.ndarray, duty: float, samples: int = 256) -> np.ndarray:
    """One rib per period: a flat band with brighter cortical edges (a lookup table: fast)."""
    x = np.arange(samples, dtype=np.float32) / samples / duty
    core = np.clip(np.sin(np.pi * np.minimum(x, 1.0)), 0.0, 1.0) ** 0.3
    cortex = np.exp(-((x / 0.12) ** 2)) + np.exp(-(((1.0 - x) / 0.12) ** 2))
    table = ((x < 1.0) * (0.85 * core + 0.15 * cortex)).astype(np.float32)
    index = ((phase - np.floor(phase)) * samples).astype(np.intp)
    return table[np.minimum(index, samples - 1)]


def _clavicles(anatomy: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Two bands from the sternal notch, steeply up at first, then flatter out to the shoulders."""
    start, slope, bend = anatomy.clavicle
    d = np.abs(u - 0.5) - 0.04
    centre = start - slope * d + bend * d * d
    offset = np.abs(v - centre) / 0.017
    band = _smoothstep((1.0 - offset) * 3.0) * (0.75 + 0.25 * offset)
    return band * _smoothstep(d / 0.02) * _smoothstep((0.40 - d) / 0.03)


def _vessels(anatomy: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Branching-looking vascular markings radiating from each hilum, fading to the periphery."""
    total = np.zeros_like(u)
    for index, side in enumerate((-1.0, 1.0)):
        du, dv = u - np.float32(0.5 + side * 0.1), v - np.float32(0.45)
        radius = cv2.magnitude(du, dv)
        texture = anatomy.vessels[index]
        map_x = cv2.phase(du, dv) * np.float32(texture.shape[1] / (2 * np.pi))
        map_y = np.minimum(radius * np.float32((texture.shape[0] - 1) / 0.45), np.float32(texture.shape[0] - 1))
        streaks = cv2.remap(texture, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        total += 0.15 * np.clip(streaks - 0.5, 0.0, None) * cv2.exp(radius * np.float32(-1.0 / 0.15))
    return total


def _mottle(anatomy: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sparse small blobs (vessels seen end-on): the clutter that makes small nodules hard to see."""
    cells = anatomy.texture.shape[0] - 1
    map_x, map_y = (u * cells).astype(np.float32), (v * cells).astype(np.float32)
    blobs = cv2.remap(anatomy.texture, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    return 0.05 * np.clip(blobs - 0.8, 0.0, None)


# --------------------------------------------------------------------------------------------
# Nodule
# --------------------------------------------------------------------------------------------


def _nodule_pixel_geometry(nodule: Nodule, view: View, size: int) -> tuple[tuple[float, float], float]:
    centre = _to_pixels(view, size, nodule.u, nodule.v)
    radius_px = nodule.size_mm / 2.0 / FIELD_OF_VIEW_MM * size / view.scale
    return centre, radius_px


def _add_nodule(attenuation: np.ndarray, mask: np.ndarray, nodule: Nodule, centre: tuple[float, float],
                radius_px: float, angle: float) -> None:
    """Add the nodule's projected density to ``attenuation`` and its disc to ``mask`` (in place)."""
    size = attenuation.shape[0]
    supersample = 3 if radius_px < 4 else (2 if radius_px < 10 else 1)  # anti-aliasing where it shows
    reach = radius_px * (2.3 if nodule.spicules else 1.2) + 2.0
    x0, x1 = max(int(centre[0] - reach), 0), min(int(centre[0] + reach) + 2, size)
    y0, y1 = max(int(centre[1] - reach), 0), min(int(centre[1] + reach) + 2, size)
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    xs = (np.arange(x0, x1)[:, None] + offsets).ravel() - centre[0]
    ys = (np.arange(y0, y1)[:, None] + offsets).ravel() - centre[1]
    dx, dy = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))
    density = _nodule_density(nodule, dx, dy, radius_px, angle)
    shape = (y1 - y0, supersample, x1 - x0, supersample)
    attenuation[y0:y1, x0:x1] += density.reshape(shape).mean(axis=(1, 3))
    yy, xx = np.mgrid[y0:y1, x0:x1]
    mask[y0:y1, x0:x1] = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius_px ** 2


def _nodule_density(nodule: Nodule, dx: np.ndarray, dy: np.ndarray, radius_px: float, angle: float) -> np.ndarray:
    """Projected thickness of a (lobulated) sphere, a calcified core and spicules."""
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx) - angle  # rotate with the view so both views show one nodule
    edge = radius_px * (1.0 + sum(a * np.cos(k * theta + p) for k, a, p in nodule.lobes))
    density = nodule.contrast * np.clip(1.0 - (r / edge) ** 2, 0.0, 1.0) ** 0.8  # a sphere, softened
    if nodule.calcified:
        core = nodule.core_ratio * radius_px
        density += nodule.core_contrast * np.sqrt(np.clip(1.0 - (r / core) ** 2, 0.0, 1.0))
    if nodule.spicules:
        spikes = np.zeros_like(r)
        for spike_angle, length, width in nodule.spicules:
            along = r * np.cos(theta - spike_angle)
            across = np.abs(r * np.sin(theta - spike_angle)) / max(width * radius_px * 0.12, 0.5)
            fade = np.clip(1.0 - (along - 0.8 * radius_px) / (length * radius_px + 1e-6), 0.0, 1.0)
            spikes = np.maximum(spikes, np.exp(-across * across) * fade * (along > 0.5 * radius_px))
        density += 0.6 * nodule.contrast * spikes
    return density


# --------------------------------------------------------------------------------------------
# Exposure and bookkeeping
# --------------------------------------------------------------------------------------------


def _expose(attenuation: np.ndarray, view: View, size: int, rng: np.random.Generator) -> np.ndarray:
    """Attenuation to display intensity: film-like curve, shading, correlated quantum-like noise."""
    shading = _resize(cv2.resize(view.shading, (16, 16), interpolation=cv2.INTER_CUBIC), size)
    signal = np.clip(attenuation + np.float32(0.03) * shading, 0.0, None)
    scale = (1.0 - view.floor) / (1.0 - math.exp(-view.gain * 1.35))
    image = np.float32(view.floor + scale) - np.float32(scale) * cv2.exp(signal * np.float32(-view.gain))
    image = np.clip(image, 0.0, 1.0)
    image += np.float32(view.bend) * image * (1.0 - image)  # a gamma-like tone bend, without pow
    image += np.float32(view.noise) * (0.5 + image) * _noise(rng, size)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _noise(rng: np.random.Generator, size: int, sigma_px: float = 0.7) -> np.ndarray:
    """Zero-mean, unit-variance, slightly correlated noise (blurred uniform bytes: near-Gaussian, fast)."""
    raw = np.frombuffer(rng.bytes(size * size), dtype=np.uint8).reshape(size, size).astype(np.float32)
    kernel = cv2.getGaussianKernel(2 * math.ceil(3 * sigma_px) + 1, sigma_px)
    blurred = cv2.sepFilter2D(raw - np.float32(127.5), -1, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    return blurred * np.float32(1.0 / (73.9 * float((kernel ** 2).sum())))


def _subtlety(nodule: Nodule) -> int:
    """JSRT-like 1 (extremely subtle) .. 5 (obvious) from contrast and size."""
    conspicuity = (nodule.contrast + 0.5 * nodule.core_contrast) * min(nodule.size_mm / 15.0, 1.0) ** 0.5
    return 1 + int(np.searchsorted(_SUBTLETY_EDGES, conspicuity))


def _info(anatomy: Anatomy, size: int, centre: tuple[float, float] | None, radius_px: float | None) -> dict:
    nodule = anatomy.nodule
    info = {
        "kind": anatomy.kind, "has_nodule": nodule is not None,
        "malignant": None if nodule is None else anatomy.kind == "malignant",
        "nodule_x": None, "nodule_y": None, "nodule_radius_px": None, "size_mm": None, "subtlety": None,
        "calcified": None, "margin": None, "location": None, "age": anatomy.age, "sex": anatomy.sex,
        "pixel_spacing_mm": FIELD_OF_VIEW_MM / size,
    }
    if nodule is not None:
        info.update(
            nodule_x=round(float(centre[0]), 2), nodule_y=round(float(centre[1]), 2),
            nodule_radius_px=round(float(radius_px), 2), size_mm=nodule.size_mm, subtlety=_subtlety(nodule),
            calcified=nodule.calcified, margin=nodule.margin, location=f"{nodule.side}.{nodule.zone} lobe",
        )
    return info


def _class_counts(n_images: int, fractions: Sequence[float]) -> dict[str, int]:
    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    malignant, benign = round(n_images * fractions[0]), round(n_images * fractions[1])
    malignant = min(malignant, n_images)
    benign = min(benign, n_images - malignant)
    return {"malignant": malignant, "benign": benign, "non_nodule": n_images - malignant - benign}


def _patient_plan(counts: dict[str, int], rng: np.random.Generator) -> list[tuple[str, int]]:
    """(kind, number of views) per patient, shuffled; ~10 % of patients have two views."""
    plan = []
    for kind, n_images in counts.items():
        twins = min(round(n_images * SECOND_VIEW_FRACTION / (1 + SECOND_VIEW_FRACTION)), n_images // 2)
        plan += [(kind, 2)] * twins + [(kind, 1)] * (n_images - 2 * twins)
    order = rng.permutation(len(plan))
    return [plan[i] for i in order]


def _write_patient(out_dir: Path, kind: str, n_views: int, patient_id: str, seed_seq: np.random.SeedSequence,
                   first_index: int, size: int, bits: int) -> list[dict]:
    rng = np.random.default_rng(seed_seq)
    anatomy = sample_anatomy(rng, kind)
    rows = []
    for view_index in range(n_views):
        phantom = render(anatomy, sample_view(rng), size, rng)
        case_id = f"PHANT{first_index + view_index + 1:04d}"
        _save_png(out_dir / "images" / f"{case_id}.png", phantom.image, bits)
        Image.fromarray(phantom.lung_mask.astype(np.uint8)).save(out_dir / "lung_masks" / f"{case_id}.png")
        rows.append(_label_row(case_id, patient_id, phantom.info, size))
    return rows


def _save_png(path: Path, image: np.ndarray, bits: int) -> None:
    top = 65535 if bits == 16 else 255
    pixels = np.round(image * top).astype(np.uint16 if bits == 16 else np.uint8)
    Image.fromarray(pixels).save(path)


def _label_row(case_id: str, patient_id: str, info: dict, size: int) -> dict:
    has_nodule = info["has_nodule"]
    row = {column: "" for column in LABEL_COLUMNS}
    row.update(image=f"images/{case_id}.png", case_id=case_id, label=info["kind"], has_nodule=int(has_nodule),
               age=info["age"], sex=info["sex"], lung_mask=f"lung_masks/{case_id}.png",
               patient_id=patient_id, synthetic=1)
    if has_nodule:
        to_2048 = 2048.0 / size
        row.update(
            malignant=int(info["malignant"]), subtlety=info["subtlety"], size_mm=f"{info['size_mm']:.1f}",
            nodule_x_2048=round(info["nodule_x"] * to_2048), nodule_y_2048=round(info["nodule_y"] * to_2048),
            nodule_x=f"{info['nodule_x']:.1f}", nodule_y=f"{info['nodule_y']:.1f}",
            nodule_radius_px=f"{info['nodule_radius_px']:.2f}", location=info["location"],
            diagnosis=f"synthetic {'calcified ' if info['calcified'] else ''}{info['margin']} nodule",
        )
    return row


def _readme(rows: list[dict], seed: int, size: int, bits: int) -> str:
    from lungdx import __version__

    counts = {kind: sum(row["label"] == kind for row in rows) for kind in KINDS[::-1]}
    patients = len({row["patient_id"] for row in rows})
    return (
        "# SYNTHETIC chest phantoms made by lungdx\n\n"
        "**These are not radiographs.** Every image here is a synthetic phantom drawn from simple shapes by\n"
        f"`lungdx.data.phantoms` (lungdx {__version__}). No patient and no real image was used to make them.\n"
        "Nothing trained, measured or evaluated on these files says anything about real chest radiographs\n"
        "or about any model's clinical performance; they exist to exercise the software end to end.\n\n"
        f"- seed: {seed}\n- images: {len(rows)} ({size} x {size} px, {bits}-bit grayscale PNG, MONOCHROME2)\n"
        f"- pixel spacing: {FIELD_OF_VIEW_MM / size:.4f} mm (the image spans {FIELD_OF_VIEW_MM:.0f} mm)\n"
        f"- patients: {patients} (some have two images from different views)\n"
        + "".join(f"- {kind}: {n}\n" for kind, n in counts.items())
        + "\n`labels.csv` follows the JSRT labels layout (nodule_x/nodule_y/nodule_radius_px in pixels of\n"
        "these images) plus `patient_id` and `synthetic` (always 1). `lung_masks/` holds the lung fields\n"
        "(uint8, 1 = lung). The same arguments regenerate byte-identical files.\n"
    )
