"""Another judge (``model.kwargs.judge``) on a finished nodule_net CV, without retraining the rest.

The judge is stage 3 only: the lung U-Net and the detector train exactly as with the default CNN
judge. This takes each fold's saved lungs and detector from a ``lungdx cv`` folder, fits or trains
the chosen judge on that fold's training split (``nodule_train.fit_size_judge`` for ``size``,
``nodule_train.train_judge`` for ``cnn`` and ``size_cnn``: the code ``lungdx cv --set
model.kwargs.judge=...`` runs), and maps all of the fold's images with it.

By default it reports the pooled **validation** rows only (each fold's validation split, scored by
that fold's refitted model; validation rows chose the judge's early-stopping epoch, so they are a
little optimistic): that is the evidence on which a judge may be chosen for a CV. ``--test`` also
pools the test folds as the CV summary does (``localisation.summarise_localisation``), with DeLong
against a reference CV on the same cases; once read, those figures must not choose anything.

    python docs/experiments/size_judge_refit.py runs/jsrt-cv10-nodule-hard --judge size --test --reference runs/jsrt-cv10-128
    python docs/experiments/size_judge_refit.py runs/jsrt-cv10-nodule-flip3 --judge size_cnn
    python docs/experiments/size_judge_refit.py runs/jsrt-cv10-nodule-flip3 --judge keep --kwarg tta=hflip

``--judge keep`` keeps the CV's judge: with no other change it scores every image again with the
CV's own models, built with the ``--kwarg`` model arguments (``tta=hflip``: the mirrored second
detector pass). ``--kwarg verifier=cnn`` also trains the candidate verifier on each fold's training
split (``nodule_train.train_verifier``, its candidate weights on the validation split), after the
saved detector; without it a CV's own verifier is kept:

    python docs/experiments/size_judge_refit.py runs/jsrt-cv10-nodule-flip3 --judge keep --kwarg verifier=cnn

``--set`` changes the CV's saved config for the refit (``nodule.judge_keep=last``, say), as
``lungdx cv --set`` would have:

    python docs/experiments/size_judge_refit.py runs/jsrt-cv10-nodule-v5-dbo --judge cnn --set nodule.judge_keep=last

Not part of lungdx: an experiment whose result is reported in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from lungdx import metrics
from lungdx.checkpoint import load_checkpoint
from lungdx.config import load_config
from lungdx.data.nodules import NoduleBank, localisation_targets
from lungdx.localisation import froc, pointing_hits, summarise_localisation
from lungdx.models import create_model
from lungdx.nodule_train import _History, _lung_logits, fit_size_judge, localiser_kwargs, nodule_outputs, train_judge, train_verifier
from lungdx.predict import sigmoid
from lungdx.runtime import Hardware
from lungdx.train import prepare_data


def refit_fold(run_dir: Path, out_dir: Path, hardware: Hardware, judge: str, kwargs: dict,
               overrides: list[str] = ()) -> pd.DataFrame:
    """The fold's nodule_outputs.csv (every split) with the judge refitted (``keep``: the saved one), the
    model built with ``kwargs`` on top of the run's and the config changed by ``overrides``; kept in
    ``out_dir`` (reused if there)."""
    if (out_dir / "nodule_outputs.csv").exists():
        return pd.read_csv(out_dir / "nodule_outputs.csv", dtype={"case_id": str})
    config = load_config(run_dir / "config.yaml", list(overrides))
    new_verifier = kwargs.get("verifier", "none") != "none"  # asked for: trained after the saved detector; else the CV's kept
    kwargs = {**config.model.kwargs, **kwargs, **({} if judge == "keep" else {"judge": judge})}
    config = replace(config, model=replace(config.model, kwargs=kwargs))
    data = prepare_data(config)
    frame = data.frame
    every = localisation_targets(frame, config.preprocess)
    targets = {split: every.subset((frame["split"] == split).to_numpy()) for split in ("train", "val")}
    images = {split: data.cache.batch(data.rows(split)["cache_index"].to_numpy()) for split in ("train", "val")}
    model = create_model(config.model.name, **localiser_kwargs(config))
    saved = load_checkpoint(run_dir / "model.pt")["state_dict"]
    retrained = (() if judge == "keep" else ("judge.",)) + (("verifier.", "verify_coef") if new_verifier else ())
    kept = {key: value for key, value in saved.items() if not key.startswith(retrained)}
    missing = model.load_state_dict(kept, strict=False)
    assert all(key.startswith(retrained) for key in missing.missing_keys) and not missing.unexpected_keys, missing
    model = hardware.prepare(model)
    lung_logits = {split: _lung_logits(model, images[split], config, hardware) for split in images}
    out_dir.mkdir(parents=True, exist_ok=True)
    history = _History(out_dir / "history.csv")
    bank = NoduleBank(images["train"], data.rows("train"), targets["train"].circles, targets["train"].malignant)
    generator = torch.Generator().manual_seed(config.train.seed + 3)
    if new_verifier:
        train_verifier(model, images, lung_logits, targets, bank, config, hardware, generator, history, True)
    if judge == "keep":
        history.append({"stage": "judge", "epoch": 0, "kept": True})
    elif judge == "size":
        fit_size_judge(model, images, lung_logits, targets, config, hardware, history)
    else:
        train_judge(model, images, lung_logits, targets, bank, config, hardware, generator, history, True)
    outputs = nodule_outputs(model, frame, data.cache.view(frame["cache_index"].to_numpy()), every, config, hardware)
    (out_dir / "judge.json").write_text(json.dumps({"coef": getattr(model.judge, "coef", torch.zeros(0)).tolist(),
                                                    "verify_coef": getattr(model, "verify_coef", torch.zeros(0)).tolist(),
                                                    "epochs": len(history), **history[-1]}, default=float))
    outputs.to_csv(out_dir / "nodule_outputs.csv", index=False)  # last: its presence marks the fold done
    return outputs


def validation_summary(rows: pd.DataFrame) -> dict[str, float]:
    """AUCs, pointing, FROC at 2 FP and the shortcut check's presence change on pooled validation rows (an
    image can be a validation row of more than one fold)."""
    nodules = rows[rows["has_nodule"] == 1]
    presence = metrics.roc_auc(rows["has_nodule"].to_numpy(), rows["presence_logit"].to_numpy())
    blacked = metrics.roc_auc(rows["has_nodule"].to_numpy(), rows["shortcut_presence_logit"].to_numpy())
    rest = (rows["malignant"].fillna(0) == 1).astype(int)
    return {"rows": len(rows), "images": rows["case_id"].nunique(), "nodule_rows": len(nodules),
            "malignant_vs_benign_auc": metrics.roc_auc(nodules["malignant"].to_numpy(), nodules["malignancy_logit"].to_numpy()),
            "nodule_vs_normal_auc": presence, "shortcut_change": blacked - presence,
            "pointing_game": float(pointing_hits(rows, 512).mean()), "froc_at_2": froc(rows, 512)[2.0],
            "malignant_vs_rest_auc": metrics.roc_auc(rest.to_numpy(), rows["task_logit"].to_numpy()),
            "labelled_size_auc": metrics.roc_auc(nodules["malignant"].to_numpy(), nodules["nodule_r"].to_numpy())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv_dir", type=Path)
    parser.add_argument("--reference", type=Path, help="a CV folder of another model on the same cases (DeLong)")
    parser.add_argument("--judge", choices=("size", "size_cnn", "cnn", "keep"), default="size",
                        help="the judge to fit or train on each fold's training split; keep: the CV's own")
    parser.add_argument("--kwarg", action="append", default=[], metavar="KEY=VALUE",
                        help="a model argument on top of the run's, e.g. tta=hflip (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a config change on top of the CV's saved config, e.g. nodule.judge_keep=last (repeatable)")
    parser.add_argument("--test", action="store_true", help="also pool and print the test folds")
    parser.add_argument("--only", nargs="+", metavar="FOLD", help="refit these folds (e.g. r0-f09) and stop: a second "
                        "process sharing the work, from the other end")
    parser.add_argument("--out", type=Path, help="where to write (default: CV_DIR-size-judge, CV_DIR-JUDGE-judge otherwise)")
    args = parser.parse_args()
    kwargs = dict(item.split("=", 1) for item in args.kwarg)
    suffix = "" if args.judge == "keep" else "-size-judge" if args.judge == "size" else f"-{args.judge.replace('_', '-')}-judge"
    suffix += "".join(f"-{key}-{value}" for key, value in kwargs.items())
    out = args.out or args.cv_dir.with_name(args.cv_dir.name + (suffix or "-rescored"))
    hardware = Hardware.resolve("auto", "fp32", True)  # fp32: the same arithmetic on every CPU
    folds = sorted(path.name for path in (args.cv_dir / "runs").iterdir())
    if args.only:  # a second process on the same --out: these folds only, no summary
        for fold in args.only:
            refit_fold(args.cv_dir / "runs" / fold, out / fold, hardware, args.judge, kwargs, args.overrides)
        return
    every = {fold: refit_fold(args.cv_dir / "runs" / fold, out / fold, hardware, args.judge, kwargs, args.overrides) for fold in folds}
    val = pd.concat([rows[rows["split"] == "val"].assign(fold=fold) for fold, rows in every.items()], ignore_index=True)
    summary = validation_summary(val)
    print("pooled validation rows:", {key: round(float(value), 3) for key, value in summary.items()})
    (out / "validation_summary.json").write_text(json.dumps(metrics.json_safe(summary), indent=2))
    if args.judge in ("size", "size_cnn"):
        coefs = [json.loads((out / fold / "judge.json").read_text())["coef"] for fold in folds]
        print("size prior per fold (a, b):", [[round(v, 2) for v in c] for c in coefs])
    if not args.test:
        return
    oof = pd.concat([rows[rows["split"] == "test"] for rows in every.values()], ignore_index=True)
    oof.to_csv(out / "oof_nodule_outputs.csv", index=False)
    result = summarise_localisation(oof, 512)
    for key in ("nodule_vs_normal_auc", "malignant_vs_rest_auc", "malignant_vs_benign_auc", "pointing_game"):
        print(f"{key}: {metrics.format_ci(result[key])}")
    print("froc:", {rate: round(entry["value"], 3) for rate, entry in result["froc"].items()})
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
