"""How much of this machine nodule_net's training uses: each stage's training step against the matmul ceiling.

Measured in one run on the same threads: the matmul rate (2048 x 2048, fp32 and, where the CPU has
native bf16, bf16; `bench/ceiling.py`), then a training step (forward, backward, Adam) of each nodule_net stage at the
sizes `configs/nodule.yaml` trains with: the lung U-Net at 128 px, the detector on 256 px crops, the
judge on 64 px crops. FLOPs per step are counted by torch's FlopCounterMode (convolutions and matmuls,
forward and backward); the share is achieved FLOP/s over the ceiling of the precision the step runs in.

    python bench/nodule_throughput.py            # prints a Markdown table (CPU named)
"""

from __future__ import annotations

import argparse
import time

import torch
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
