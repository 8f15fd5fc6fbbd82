"""The size judge (``model.kwargs.judge=size``) on a finished nodule_net CV, without retraining the rest.

``judge=size`` changes only stage 3: the lung U-Net and the detector train exactly as with the
CNN judge. This takes each fold's saved lungs and detector from a ``lungdx cv`` folder, fits the
size judge on that fold's training split (``nodule_train.fit_size_judge``, the code ``lungdx cv
--set model.kwargs.judge=size`` runs), maps the fold's test images with it, and pools the test
folds as the CV summary does (``localisation.summarise_localisation``), with DeLong against a
reference CV on the same cases.

    python docs/experiments/size_judge_refit.py runs/jsrt-cv10-nodule-hard --reference runs/jsrt-cv10-128

Not part of lungdx: an experiment whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pandas as pd

from lungdx import metrics
from lungdx.checkpoint import load_checkpoint
from lungdx.config import load_config
from lungdx.data.nodules import localisation_targets
from lungdx.localisation import summarise_localisation
from lungdx.models import create_model
from lungdx.nodule_train import _History, _lung_logits, fit_size_judge, localiser_kwargs, nodule_outputs
from lungdx.predict import sigmoid
from lungdx.runtime import Hardware
from lungdx.train import prepare_data


def refit_fold(run_dir: Path, out_dir: Path, hardware: Hardware) -> pd.DataFrame:
    config = load_config(run_dir / "config.yaml")
    config = replace(config, model=replace(config.model, kwargs={**config.model.kwargs, "judge": "size"}))
    data = prepare_data(config)
    frame = data.frame
    every = localisation_targets(frame, config.preprocess)
    targets = {split: every.subset((frame["split"] == split).to_numpy()) for split in ("train", "val")}
    images = {split: data.cache.batch(data.rows(split)["cache_index"].to_numpy()) for split in ("train", "val")}
    model = create_model(config.model.name, **localiser_kwargs(config))
    saved = load_checkpoint(run_dir / "model.pt")["state_dict"]
    kept = {key: value for key, value in saved.items() if not key.startswith("judge.")}
    missing = model.load_state_dict(kept, strict=False)
    assert set(missing.missing_keys) == {"judge.coef"}, missing
    model = hardware.prepare(model)
    lung_logits = {split: _lung_logits(model, images[split], config, hardware) for split in images}
    out_dir.mkdir(parents=True, exist_ok=True)
    history = _History(out_dir / "history.csv")
    fit_size_judge(model, images, lung_logits, targets, config, hardware, history)
    outputs = nodule_outputs(model, frame, data.cache.view(frame["cache_index"].to_numpy()), every, config, hardware)
    outputs.to_csv(out_dir / "nodule_outputs.csv", index=False)
    (out_dir / "judge.json").write_text(json.dumps({"coef": model.judge.coef.tolist(), **history[-1]}, default=float))
    return outputs[outputs["split"] == "test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dir", type=Path)
    parser.add_argument("--reference", type=Path, help="a CV folder of another model on the same cases (DeLong)")
    parser.add_argument("--out", type=Path, help="where to write (default: CV_DIR-size-judge)")
    args = parser.parse_args()
    out = args.out or args.cv_dir.with_name(args.cv_dir.name + "-size-judge")
    hardware = Hardware.resolve("auto", "fp32", True)  # fp32: the same arithmetic on every CPU
    oof = pd.concat([refit_fold(run, out / run.name, hardware) for run in sorted((args.cv_dir / "runs").iterdir())],
                    ignore_index=True)
    oof.to_csv(out / "oof_nodule_outputs.csv", index=False)
    result = summarise_localisation(oof, 512)
    for key in ("nodule_vs_normal_auc", "malignant_vs_rest_auc", "malignant_vs_benign_auc", "pointing_game"):
        print(f"{key}: {metrics.format_ci(result[key])}")
    print("froc:", {rate: round(entry["value"], 3) for rate, entry in result["froc"].items()})
    folds = sorted(path.name for path in (args.cv_dir / "runs").iterdir())
    coefs = [json.loads((out / fold / "judge.json").read_text())["coef"] for fold in folds]
    print("size judge per fold (a, b per 100 px):", [[round(v, 2) for v in c] for c in coefs])
    if args.reference:
        reference = pd.read_csv(args.reference / "oof_predictions.csv", dtype={"case_id": str})
        merged = oof.merge(reference, on="case_id", suffixes=("", "_ref"))
        rest = sigmoid(merged["task_logit"].to_numpy())
        y = (merged["malignant"].fillna(0) == 1).astype(int).to_numpy()
        test = metrics.delong_test(y, merged["probability"].to_numpy(), rest)
        print(f"DeLong vs {args.reference} on {len(merged)} cases (malignant_vs_rest):",
              {key: round(float(value), 4) for key, value in test.items()})
    (out / "summary.json").write_text(json.dumps(metrics.json_safe(result), indent=2))


if __name__ == "__main__":
    main()
