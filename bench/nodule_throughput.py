"""How much of this machine nodule_net's training uses: each stage's training step against the matmul ceiling.

Measured in one run on the same threads: the matmul rate (2048 x 2048, fp32 and, where the CPU has
native bf16, bf16; `bench/ceiling.py`), then a training step (forward, backward, Adam) of each nodule_net stage at the
sizes `configs/nodule.yaml` trains with: the lung U-Net at 128 px, the detector on 256 px crops, the
judge on 64 px crops. FLOPs per step are counted by torch's FlopCounterMode (convolutions and matmuls,
forward and backward); the share is achieved FLOP/s over the ceiling of the precision the step runs in.

Then the detector's whole training step as `lungdx cv` runs it with `configs/nodule-blackout.yaml`
(`nodule_train._detector_step`: the sampler `_DetectorBatches.sample` with its warp, intensity
augmentation, mirror and black-outs; the lung mask; one 256 px crop from each of 16 images of 512 px;
forward, backward, Adam), on synthetic images, with the sampling grid of the warps from torch's
`F.affine_grid` (the baseline) and from `lungdx.data.augment.affine_grid`, the two taking turns step by
step. The sampler is also timed on its own.

    python bench/nodule_throughput.py            # prints Markdown tables (CPU named)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ceiling import count_flops, cpu_model, measure_ceilings, precision_name

from lungdx.models import create_model
from lungdx.runtime import Hardware, tune_allocator


def step_rate(module: torch.nn.Module, batch: torch.Tensor, hardware: Hardware, steps: int) -> tuple[float, float]:
    """(images per second, FLOP per image) of a training step on ``batch`` (loss: the mean output)."""
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    module.train()

    def step():
        with hardware.autocast():
            loss = module(batch).float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    flops = count_flops(step) / len(batch)
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(batch) / (time.perf_counter() - start), flops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per stage")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_allocator()
    hardware = Hardware.resolve("cpu", "auto", "auto")
    ceilings = measure_ceilings(hardware.amp_dtype)
    precision = precision_name(hardware.amp_dtype)
    model = create_model("nodule_net", input_size=512)
    stages = {"lungs (U-Net, 128 px, batch 16)": (model.lungs, (16, 1, 128, 128)),
              "detector (FPN, 256 px crops, batch 16)": (model.detector, (16, 1, 256, 256)),
              "judge (CNN, 64 px crops, batch 32)": (model.judge, (32, 1, 64, 64))}
    print(f"CPU: {cpu_model()}, {args.threads} threads, torch {torch.__version__}, autocast {precision}, "
          f"channels_last {hardware.channels_last}")
    print("Matmul ceiling (2048x2048): " + ", ".join(f"{name} {rate / 1e9:.0f} GFLOP/s" for name, rate in ceilings.items()))
    print()
    print(f"| Stage | Training images/s | GFLOP per image | GFLOP/s | Share of the {precision} ceiling |")
    print("|---|---|---|---|---|")
    for name, (module, shape) in stages.items():
        module = hardware.prepare(module)
        batch = torch.randn(shape)
        if hardware.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        rate, flops = step_rate(module, batch, hardware, args.steps)
        achieved = rate * flops
        print(f"| {name} | {rate:.1f} | {flops / 1e9:.3f} | {achieved / 1e9:.0f} | {achieved / ceilings[precision]:.0%} |")
    print()
    detector_step_table(hardware, args.steps)
    return 0


def detector_step_table(hardware: Hardware, steps: int) -> None:
    """The detector's data + training step with torch's and lungdx's affine grid, alternating step by step."""
    from lungdx import nodule_train
    from lungdx.config import load_config
    from lungdx.data import augment

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "nodule-blackout.yaml")
    size, count = config.preprocess.size, 64
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(count, size, size, generator=generator).numpy() * 0.5 + 0.25
    lung_logits = torch.full((count, 1, size // 4, size // 4), -1.0)
    lung_logits[..., size // 32 : -size // 32, size // 32 : -size // 32] = 1.0  # a lung field inside the film
    circles = np.full((count, 3), np.nan, np.float32)
    circles[::2] = (size / 3, size / 2, 10.0)  # every other image has a nodule
    model = create_model("nodule_net", input_size=size, **config.model.kwargs)
    model.detector = hardware.prepare(model.detector)
    batches = nodule_train._DetectorBatches(images, lung_logits, None, circles, np.ones(count, np.float32), None, config,
                                            generator)
    optimizer = torch.optim.Adam(model.detector.parameters(), lr=1e-4)
    grids = {"torch F.affine_grid (baseline)": lambda theta, shape: F.affine_grid(theta, shape, align_corners=False),
             "lungdx affine_grid": augment.affine_grid}
    sampler_seconds = {name: [] for name in grids}
    step_seconds = {name: [] for name in grids}
    rng = np.random.default_rng(0)
    for turn in range(steps + 1):  # the first turn warms up and is not counted
        for name, grid in grids.items():
            augment.affine_grid = grid  # what augment.warp, the sampler's warp, calls
            index = np.sort(rng.choice(count, config.nodule.batch_size, replace=False))
            started = time.perf_counter()
            batches.sample(index)
            sampled = time.perf_counter()
            loss = nodule_train._detector_step(model, batches, index, config, hardware)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if turn:
                sampler_seconds[name].append(sampled - started)
                step_seconds[name].append(time.perf_counter() - sampled)
    augment.affine_grid = grids["lungdx affine_grid"]
    print(f"Detector training step as configs/nodule-blackout.yaml trains it ({config.nodule.batch_size} images of "
          f"{size} px, one {config.nodule.crop} px crop each; median of {steps} steps each, taking turns)")
    print()
    print("| Sampling grid | sampler alone (s) | whole step (s) | whole step, ratio to baseline |")
    print("|---|---|---|---|")
    base = statistics.median(step_seconds["torch F.affine_grid (baseline)"])
    for name in grids:
        sampler, step = statistics.median(sampler_seconds[name]), statistics.median(step_seconds[name])
        print(f"| {name} | {sampler:.3f} | {step:.3f} | {base / step:.2f}x |")


if __name__ == "__main__":
    raise SystemExit(main())
