"""Scaling of ``lungdx train`` over processes on one machine: 1 process against torchrun with N (gloo on CPU).

Every run trains the same model on the same cached images with the same global batch, seed and
epochs; only the number of processes (and the threads each gets) changes. The figure is the
training images/s per epoch that ``fit`` writes to ``history.csv`` (all ranks' images over rank 0's
training time; validation excluded), the median over the epochs after the first (which warms up),
and every run is also given as a ratio against the 1-process run with all the threads, measured
in the same invocation. A 1-process run with one process's share of the threads is timed too: it
tells the cost of DDP's communication apart from the effect of fewer threads per process. The
cache is built once before the timed runs.

Usage::

    python bench/distributed_scaling.py                          # 320 phantoms, paper_cnn at 128 px, batch 64
    python bench/distributed_scaling.py --data ../shared/data/jsrt --size 256
    python bench/distributed_scaling.py --processes 1 2 4 --threads 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def _run(processes: int, threads: int, common: list[str], out: Path) -> dict:
    """One ``lungdx train``: plain for one process, under torchrun for several; ``threads`` per process."""
    launch = ([sys.executable, "-m", "lungdx"] if processes == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "lungdx"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run([*launch, "-q", "train", *common, "--out", str(out)], env=env, check=True)
    wall = time.perf_counter() - started
    history = pd.read_csv(out / "history.csv")
    rates = history["train_images_per_s"].tolist()
    return {"processes": processes, "threads": threads, "img_s": statistics.median(rates[1:] or rates),
            "epochs": [round(r, 1) for r in rates], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="dataset folder (default: phantoms made in a temp folder)")
    parser.add_argument("--images", type=int, default=320, help="phantoms to make (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="input size in px (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (default: %(default)s)")
    parser.add_argument("--processes", type=int, nargs="+", default=[2], help="process counts to compare with 1")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads in all: the 1-process run gets them all, N processes get threads/N each")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lungdx-scaling-") as temp:
        temp = Path(temp)
        data = Path(args.data) if args.data else temp / "phantoms"
        if not args.data:
            from lungdx.data.phantoms import write_phantom_dataset

            write_phantom_dataset(data, args.images, size=512, seed=0)
        common = ["--data", str(data), "--task", "malignant_vs_rest", "--set", f"data.cache_dir={temp / 'cache'}",
                  "--set", f"preprocess.size={args.size}", "--set", f"train.batch_size={args.batch_size}",
                  "--set", f"train.epochs={args.epochs}", "--set", f"train.patience={args.epochs}",
                  *[item for value in args.set for item in ("--set", value)]]
        # The cache is built here, untimed, so that no run pays for decoding.
        subprocess.run([sys.executable, "-m", "lungdx", "-q", "train", *common, "--set", "train.epochs=1",
                        "--out", str(temp / "warm")], check=True)
        load_before = _load()
        runs = [_run(1, args.threads, common, temp / "p1")]
        for n in (n for n in args.processes if n > 1):
            threads = max(args.threads // n, 1)
            if threads < args.threads and not any(r["processes"] == 1 and r["threads"] == threads for r in runs):
                runs.append(_run(1, threads, common, temp / f"p1t{threads}"))  # one process's share of the threads
            runs.append(_run(n, threads, common, temp / f"p{n}"))
        load_after = _load()

    import torch
    from ceiling import cpu_model  # bench/ceiling.py: a script's own folder is on sys.path

    base = runs[0]["img_s"]
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}; "
          f"load average {load_before} before, {load_after} after")
    print(f"paper_cnn at {args.size} px, global batch {args.batch_size}, {args.epochs} epochs, "
          f"{'phantoms' if not args.data else args.data}; img/s = median of epochs 2..{args.epochs}\n")
    print("| processes | threads each | train img/s | ratio | per-epoch img/s | wall s (incl. start-up) |")
    print("|---:|---:|---:|---:|---|---:|")
    for run in runs:
        print(f"| {run['processes']} | {run['threads']} | {run['img_s']:.1f} | {run['img_s'] / base:.2f}x | "
              f"{', '.join(map(str, run['epochs']))} | {run['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
