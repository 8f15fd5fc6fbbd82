"""GPU check: lungdx's CUDA path end to end, and training/inference throughput per precision.

Run on a machine with an NVIDIA GPU (CI has none; this is a manual check):

    python bench/gpu_check.py --out runs/gpu-check

1. The whole chain on synthetic phantoms on CUDA with ``precision=auto`` (bf16 autocast on GPUs
   that support it): fit, evaluate, and the Predictor on CUDA vs CPU (fp32) on the same images.
2. Throughput of ``paper_cnn`` at 256 px, batch 64: training and inference images/s for fp32,
   bf16 autocast, fp16 AMP (GradScaler), each with and without channels_last, printed as ratios
   against fp32 contiguous measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def throughput(precision: str, channels_last: bool, *, size: int, batch: int, steps: int, train: bool,
               model_name: str = "paper_cnn") -> float:
    """Images per second of one registered model on CUDA for one setting (median of 3 timed blocks)."""
    from lungdx.models import create_model
    from lungdx.train import optimizer_step

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = create_model(model_name, input_size=size).to(device)
    images = torch.randn(batch, 1, size, size, device=device)
    target = torch.randint(0, 2, (batch, 1), device=device).float()
    if channels_last:
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    model.train(train)

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            if not train:
                with torch.inference_mode():
                    return model(images)
            logits = model(images)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        optimizer_step(loss, optimizer, scaler)
        return loss

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        rates.append(batch * steps / (time.perf_counter() - started))
    return statistics.median(rates)


def end_to_end(out: Path, images: int, epochs: int) -> dict:
    """Phantoms -> fit on CUDA -> evaluate -> Predictor on CUDA vs CPU."""
    from lungdx.config import apply_overrides, load_config
    from lungdx.data.phantoms import write_phantom_dataset
    from lungdx.evaluate import evaluate_run
    from lungdx.predict import Predictor
    from lungdx.train import fit

    data = out / "data"
    write_phantom_dataset(data, images, size=256, seed=0)
    config = apply_overrides(load_config(), [f"data.path={data}", f"data.cache_dir={out / 'cache'}",
                                             "data.task=nodule_vs_normal", f"train.epochs={epochs}",
                                             "train.device=cuda", "train.precision=auto"])
    started = time.perf_counter()
    result = fit(config, out / "run")
    fit_seconds = time.perf_counter() - started
    results = evaluate_run(result.run_dir, device="cuda")
    files = sorted((data / "images").iterdir())[:16]
    on_gpu = Predictor.from_path(result.run_dir, device="cuda", precision="fp32").predict_files(files)
    on_cpu = Predictor.from_path(result.run_dir, device="cpu", precision="fp32").predict_files(files)
    difference = max(abs(a.probability - b.probability) for a, b in zip(on_gpu, on_cpu, strict=True))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    return {"fit_seconds": round(fit_seconds, 1), "epochs": len(result.history), "autocast": summary["autocast"],
            "device": summary["device"], "history": result.history,
            "test_auc": results["splits"]["test"]["roc_auc"], "val_auc": results["splits"]["val"]["roc_auc"],
            "max_prob_diff_gpu_vs_cpu_fp32": difference}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", default="paper_cnn", help="comma-separated registered models to time")
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs an NVIDIA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"torch": str(torch.__version__), "gpu": torch.cuda.get_device_name(0),
              "bf16_supported": torch.cuda.is_bf16_supported()}
    print(json.dumps(report))
    rows = []
    for model_name in args.models.split(","):
        for train in (True, False):
            for precision in ("fp32", "bf16", "fp16"):
                for channels_last in (False, True):
                    rate = throughput(precision, channels_last, size=args.size, batch=args.batch_size,
                                      steps=args.steps, train=train, model_name=model_name)
                    rows.append({"model": model_name, "mode": "train" if train else "inference", "precision": precision,
                                 "channels_last": channels_last, "images_per_s": round(rate, 1)})
                    print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["mode"] == row["mode"]
                    and r["precision"] == "fp32" and not r["channels_last"])
        row["ratio_vs_fp32"] = round(row["images_per_s"] / base["images_per_s"], 2)
    report["throughput"] = rows
    print("| model | mode | precision | channels_last | images/s | x fp32 |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['mode']} | {row['precision']} | {row['channels_last']} | {row['images_per_s']} | "
              f"{row['ratio_vs_fp32']} |")
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    if args.skip_end_to_end:
        return 0
    report["end_to_end"] = end_to_end(args.out, args.images, args.epochs)
    print(json.dumps({k: v for k, v in report["end_to_end"].items() if k != "history"}, indent=1, default=str))
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
