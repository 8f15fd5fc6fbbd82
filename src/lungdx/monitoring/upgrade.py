"""Data-driven upgrades: export the confirmed cases to retrain on, and challenge the served model.

Images are not in the database. When the service runs with an image archive
(``MonitorSettings.archive_dir``, ``lungdx serve --archive DIR``), each image's pixels are kept
there as a header-free 16-bit PNG named by its prediction id; the export points at those files and
``challenge`` scores them with both models. Without an archive, the export still lists every
confirmed case with its pseudonymous ``case_key``: a site that keeps its own SOP Instance UID ->
file mapping resolves a key with ``Monitor.case_key(uid)`` (the HMAC secret stays in the database).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lungdx import metrics
from lungdx.monitoring import store
from lungdx.monitoring.monitor import Monitor

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image", "case_id", "patient_id", "label", "target", "reader", "confirmed_at", "model_version",
                    "model_probability", "manufacturer", "view_position", "pixel_spacing", "image_size", "case_key"]
"""``image`` is read by ``lungdx.data.manifest.read_manifest``; ``patient_id`` is the case key (image level)."""


def archive_folder(monitor: Monitor, archive_dir: str | Path | None = None) -> Path | None:
    """The given archive folder, else the one the service recorded in the database, else None."""
    if archive_dir is not None:
        return Path(archive_dir)
    recorded = store.read_setting(monitor.engine, "archive_dir")
    return Path(recorded) if recorded else None


def _archived_image(folder: Path | None, case: dict) -> Path | None:
    if folder is None or not case["archived"]:
        return None
    path = folder / f"{case['id']}.png"
    return path if path.is_file() else None


def task_columns(task: str | None, target: int) -> dict:
    """The label columns that ``apply_task(frame, task)`` reads, so the export retrains on the same task."""
    if task == "nodule_vs_normal":
        return {"has_nodule": target}
    if task == "malignant_vs_benign":
        return {"has_nodule": 1, "malignant": target}
    if task == "malignant_vs_rest":
        return {"malignant": target}
    if task and "=" in task:
        column, value = task.split("=", 1)
        return {column: value if target else f"not {value}"}
    return {task: target} if task else {}


def export_feedback(monitor: Monitor, out: str | Path, *, archive_dir: str | Path | None = None,
                    include_missing: bool = False) -> dict:
    """Write the confirmed cases (every model) as a manifest CSV; returns counts.

    Rows whose image is not in the archive are left out unless ``include_missing`` (then ``image``
    is empty and ``case_key`` must be resolved by the site). ``target`` and the task's label columns
    use the reader's label, not the model's.
    """
    import pandas as pd

    folder = archive_folder(monitor, archive_dir)
    rows, missing = [], 0
    for case in monitor.confirmed(all_versions=True):
        image = _archived_image(folder, case)
        if image is None:
            missing += 1
            if not include_missing:
                continue
        rows.append({"image": str(image.resolve()) if image else "", "case_id": case["id"], "patient_id": case["case_key"],
                     "label": case["true_class"], "target": case["true_label"], "reader": case["reader"],
                     "confirmed_at": case["confirmed_at"].isoformat() + "Z", "model_version": case["model_version"],
                     "model_probability": case["probability"], "manufacturer": case["manufacturer"],
                     "view_position": case["view_position"], "pixel_spacing": case["pixel_spacing"],
                     "image_size": case["image_size"], "case_key": case["case_key"],
                     **task_columns(monitor.description.get("task"), case["true_label"])})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(MANIFEST_COLUMNS + [k for r in rows for k in r])))
    frame.to_csv(out, index=False)
    return {"path": str(out), "rows": len(rows), "without_image": missing, "archive": str(folder) if folder else None}


def _score(predictor, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    if predictor.threshold is None:
        raise ValueError("the model has no operating threshold; a paired comparison of decisions needs one")
    predictions = predictor.predict_files(paths)  # the CLI's path: read, level, predict, threshold
    failed = [p for p in predictions if p.error]
    if failed:
        raise ValueError(f"{len(failed)} archived image(s) cannot be read, e.g. {failed[0].error}")
    return (np.array([p.probability for p in predictions]), np.array([p.label for p in predictions], dtype=int))


def challenge(monitor: Monitor, candidate: str | Path, *, current: str | Path | None = None,
              archive_dir: str | Path | None = None, n_resamples: int = 2000, confidence: float = 0.95,
              seed: int = 0, device: str = "auto") -> dict:
    """Candidate (B) against the current model (A) on the confirmed, archived cases: DeLong, paired bootstrap, McNemar.

    Args:
        candidate: run folder or checkpoint of the new model; it scores the archived images.
        current: the current model's run folder; it re-scores the same images. Without it the
            logged probabilities and labels of the monitor's model are used (its cases only).
        archive_dir: overrides the archive folder recorded by the service.

    Returns:
        The ``lungdx.compare.compare_runs`` fields (``comparison_markdown`` prints them) plus
        ``cases`` and ``confirmed_without_image``.
    """
    from lungdx.predict import Predictor

    folder = archive_folder(monitor, archive_dir)
    if folder is None:
        raise ValueError("no image archive: run the service with an archive folder (lungdx serve --archive DIR) or "
                         "pass --archive; the log itself holds no images")
    confirmed = monitor.confirmed(all_versions=current is not None)
    cases = [(case, _archived_image(folder, case)) for case in confirmed]
    usable = [(case, path) for case, path in cases if path is not None]
    y_true = np.array([case["true_label"] for case, _ in usable], dtype=int)
    if len(usable) < 2 or y_true.min() == y_true.max():
        raise ValueError(f"{len(usable)} confirmed cases have archived images in {folder}"
                         f"{' (' + str(int(y_true.sum())) + ' positive)' if len(usable) else ''}; "
                         "a paired comparison needs both classes")
    paths = [path for _, path in usable]
    predictor_b = Predictor.from_path(candidate, device=device)
    score_b, label_b = _score(predictor_b, paths)
    if current is not None:
        predictor_a = Predictor.from_path(current, device=device)
        score_a, label_a = _score(predictor_a, paths)
        name_a = f"{current} ({predictor_a.identity['version']})"
    else:
        score_a = np.array([case["probability"] for case, _ in usable], dtype=float)
        label_a = np.array([case["label"] if case["label"] is not None else int(case["probability"] >= 0.5)
                            for case, _ in usable], dtype=int)
        name_a = f"logged predictions of {monitor.identity['name']} {monitor.version}"
    groups = np.array([case["case_key"] for case, _ in usable])
    return {"run_a": name_a, "run_b": f"{candidate} ({predictor_b.identity['version']})",
            "n_cases": len(usable), "n_positive": int(y_true.sum()), "confidence": confidence,
            "cases": f"confirmed cases of the monitoring log with archived images ({folder})",
            "confirmed_without_image": len(cases) - len(usable),
            "delong": metrics.delong_test(y_true, score_a, score_b, confidence),
            "paired_bootstrap": metrics.paired_bootstrap_auc_difference(y_true, score_a, score_b, groups=groups,
                                                                        n_resamples=n_resamples, confidence=confidence,
                                                                        seed=seed),
            "mcnemar": metrics.mcnemar_test(y_true, label_a, label_b),
            "accuracy_a": float(np.mean(label_a == y_true)), "accuracy_b": float(np.mean(label_b == y_true))}
