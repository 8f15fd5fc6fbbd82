"""Training and inference throughput of ``paper_cnn``: lungdx's pipeline against a hand-written one.

Both pipelines run in the same invocation, each in its own subprocess (the glibc allocator
setting that ``lungdx.runtime.tune_allocator`` makes is process-wide, so the baseline must never
inherit it), on the same image files:

- baseline: what a user writes by hand: ``torchvision.datasets.ImageFolder`` with PIL transforms
  (Grayscale, Resize, CenterCrop, ToTensor, Normalize) that decode every file every epoch, a torch
  ``DataLoader`` with ``num_workers=2`` (the PyTorch "Training a classifier" tutorial's choice),
  eager fp32, contiguous tensors, the default allocator, Adam and BCE.
- lungdx: ``build_cache`` decodes and levels every file once into a memory-mapped array; each step
  reads a batch from it, augments, normalises (``model_input``) and runs the model with the
  memory format and autocast that ``lungdx.runtime`` picks for ``auto`` on this machine, after
  ``tune_allocator`` (as the CLI does).

The lungdx process also measures the machine's ceiling on its threads: the rate of a 2048 x 2048
matmul in fp32 and, where the CPU has native bf16, bf16 (``bench/ceiling.py``, shared with
``nodule_throughput.py``). FLOPs per training and per inference image are counted by torch's
FlopCounterMode; lungdx's training step (timed apart from the data inside the same steps), its
end-to-end training, its batch inference and its batch-1 latency are reported as GFLOP/s and as a
share of the ceiling of the precision ``lungdx.runtime`` runs them in (bf16 where it picks bf16
autocast, fp32 otherwise).

A third part times lungdx's model step alone (normalise, forward, BCE, Adam step; and a batch
inference) for every combination of the levers: allocator, memory format and bf16 autocast, so
that the ``auto`` defaults of ``lungdx.runtime`` can be checked on the CPU at hand.

Every figure is the median over repeated steps after a warm-up step, and every speed is also
given as a ratio against the baseline measured in the same run. Runs on a busy machine are noisy:
the load average before and after is printed with the results.

Usage::

    python bench/train_throughput.py                       # 1024 px 8-bit PNG phantoms, made in a temp folder
    python bench/train_throughput.py --data ../shared/data/jsrt/images
    python bench/train_throughput.py --steps 5 --lever-batch 64 --skip-baseline
    python bench/train_throughput.py --images 8 --batch-size 4 --size 64 --steps 1 --skip-baseline --skip-levers  # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RESULT_PREFIX = "RESULT "


# ----------------------------------------------------------------------------------------------
# Data: class folders (``normal/``, ``nodule/``) that ImageFolder and lungdx both read.


def _write_phantom(job: tuple[str, int, str]) -> None:
    from PIL import Image

    from lungdx.data.phantoms import make_phantom

    path, seed, kind = job
    pixels, _ = make_phantom(np.random.default_rng(seed), size=1024, kind=kind)
    Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L").save(path)


def make_synthetic_folder(root: Path, count: int, workers: int, unique: int = 32) -> None:
    """``count`` 1024 x 1024 8-bit PNG phantoms (like JSRT's PNG release), half with a nodule.

    Only ``unique`` phantoms are drawn (drawing is the slow part); the other files are copies of
    them, which cost the same to decode.
    """
    jobs = []
    for index in range(count):
        kind = "non_nodule" if index % 2 == 0 else ("benign", "malignant")[(index // 2) % 2]
        folder = root / ("normal" if kind == "non_nodule" else "nodule")
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"phantom_{index:04d}.png"), index, kind))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_write_phantom, jobs[:unique]))
    for index, (path, _, _) in enumerate(jobs[unique:], start=unique):
        shutil.copyfile(jobs[index % unique][0], path)  # same parity, so the same class


def link_real_folder(source: Path, root: Path, count: int | None) -> None:
    """Class folders of symbolic links to the images of ``source`` (which is only read).

    Sub-folders of ``source`` are taken as classes; a flat folder is split by JSRT's file names
    (``JPCLN*`` has a nodule, ``JPCNN*`` has not) and anything else counts as ``normal``.
    """
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SystemExit(f"--data {source}: no PNG/JPEG images found")
    if count:  # evenly spaced, so that both classes stay represented
        files = [files[i] for i in np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int)]
    for file in files:
        if file.parent != source:
            label = file.parent.name
        else:
            label = "nodule" if file.name.upper().startswith("JPCLN") else "normal"
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / file.name).symlink_to(file.resolve())


def list_images(root: Path) -> tuple[list[str], list[int]]:
    """Paths and labels in ImageFolder's order (classes sorted by name, files sorted)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            paths.append(str(file))
            labels.append(label)
    return paths, labels


# ----------------------------------------------------------------------------------------------
# Workers: each runs in a fresh interpreter and prints one RESULT line of JSON.


def _setup_torch(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    return torch


def _train_tools(torch, size: int):
    from lungdx.models import create_model

    model = create_model("paper_cnn", input_size=size)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), torch.nn.BCEWithLogitsLoss()


def _median_rate(seconds: list[float], images_per_step: int) -> float:
    return images_per_step / statistics.median(seconds)


def _median_seconds(run, repeats: int) -> float:
    """Median seconds of ``run()`` over ``repeats`` calls after one warm-up call."""
    run()
    return statistics.median(_seconds(run) for _ in range(repeats))


def _time_inference(model, run_batch, spec: dict) -> float:
    """Median images/s of ``run_batch()`` (one batch) after one warm-up call."""
    model.eval()
    return spec["batch_size"] / _median_seconds(run_batch, spec["inference_repeats"])


def worker_baseline(spec: dict) -> dict:
    """The hand-written pipeline: ImageFolder + PIL every epoch, DataLoader, eager fp32."""
    torch = _setup_torch(spec)
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    size = spec["size"]
    transform = transforms.Compose([transforms.Grayscale(), transforms.Resize(size), transforms.CenterCrop(size),
                                    transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    dataset = datasets.ImageFolder(spec["root"], transform=transform)
    loader = DataLoader(dataset, batch_size=spec["batch_size"], shuffle=True, num_workers=spec["loader_workers"],
                        drop_last=True)
    started = time.perf_counter()
    decoded = sum(len(labels) for _, labels in loader)
    decode_rate = decoded / (time.perf_counter() - started)

    model, optimizer, loss_fn = _train_tools(torch, size)
    model.train()
    step_seconds: list[float] = []
    wanted = spec["warmup"] + spec["steps"]
    while len(step_seconds) < wanted:  # epochs: the loader decodes every file again each time
        started = time.perf_counter()
        for images, labels in loader:
            logits = model(images)
            loss = loss_fn(logits, labels.float()[:, None])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            now = time.perf_counter()  # includes waiting for the loader: that is the pipeline
            step_seconds.append(now - started)
            started = now
            if len(step_seconds) == wanted:
                break

    images, _ = next(iter(loader))

    def run_batch():
        with torch.no_grad():
            model(images)

    return {"train_img_s": _median_rate(step_seconds[spec["warmup"]:], spec["batch_size"]),
            "infer_img_s": _time_inference(model, run_batch, spec),
            "decode_img_s": decode_rate, "step_s": step_seconds}


def worker_lungdx(spec: dict) -> dict:
    """lungdx's pipeline: decode once into the cache, then augment + model step from the cache.

    Also measures, in this process and on its threads, the matmul ceiling and the FLOPs per image,
    and times the model step apart from the data (inside the same steps) and a one-image inference.
    """
    from ceiling import measure_ceilings

    from lungdx import runtime

    allocator_tuned = runtime.tune_allocator()  # first, like the CLI
    torch = _setup_torch(spec)
    from lungdx.config import AugmentConfig, PreprocessConfig
    from lungdx.data.augment import augment
    from lungdx.data.cache import build_cache
    from lungdx.predict import compute_logits, model_input
    from lungdx.train import optimizer_step

    hardware = runtime.Hardware.resolve("cpu", spec["precision"], spec["channels_last"])
    preprocess, augmentation = PreprocessConfig(size=spec["size"]), AugmentConfig()
    paths, labels = list_images(Path(spec["root"]))
    started = time.perf_counter()
    cache = build_cache(paths, preprocess, spec["cache_dir"], workers=spec["threads"])
    cache_seconds = time.perf_counter() - started
    if not cache.valid.all():
        raise RuntimeError(f"unreadable images: {cache.errors}")

    flops = _flops_per_image(torch, spec, hardware, preprocess, cache.batch(np.arange(min(2, len(paths)))))
    ceilings = measure_ceilings(hardware.amp_dtype)
    model, optimizer, loss_fn = _train_tools(torch, spec["size"])
    model = hardware.prepare(model)
    model.train()
    generator = torch.Generator().manual_seed(1)
    targets = np.asarray(labels, dtype=np.float32)
    batch_size, step_seconds, model_seconds = spec["batch_size"], [], []
    while len(step_seconds) < spec["warmup"] + spec["steps"]:
        order = torch.randperm(len(paths), generator=generator).numpy()
        for start in range(0, len(order) - batch_size + 1, batch_size):  # drop_last, like the baseline
            started = time.perf_counter()
            batch_index = np.sort(order[start:start + batch_size])
            levelled = torch.from_numpy(cache.batch(batch_index))[:, None]
            augmented = augment(levelled, augmentation, generator)
            prepared = time.perf_counter()  # the model step (as in the lever table) starts at model_input
            images = model_input(augmented, preprocess, hardware)
            with hardware.autocast():
                logits = model(images)
            loss = loss_fn(logits.float(), torch.from_numpy(targets[batch_index])[:, None])
            optimizer_step(loss, optimizer, None)
            finished = time.perf_counter()
            step_seconds.append(finished - started)
            model_seconds.append(finished - prepared)
            if len(step_seconds) == spec["warmup"] + spec["steps"]:
                break

    levelled = cache.batch(np.arange(batch_size))

    def run_batch():
        compute_logits(model, levelled, preprocess, hardware, batch_size)

    def run_one():
        compute_logits(model, levelled[:1], preprocess, hardware, 1)

    result = {"train_img_s": _median_rate(step_seconds[spec["warmup"]:], batch_size),
              "model_step_img_s": _median_rate(model_seconds[spec["warmup"]:], batch_size),
              "infer_img_s": _time_inference(model, run_batch, spec),
              "latency_ms": 1000 * _median_seconds(run_one, max(3, spec["inference_repeats"])),
              "cache_s": cache_seconds, "images": len(paths), "step_s": step_seconds, "model_step_s": model_seconds,
              "autocast": str(hardware.amp_dtype), "channels_last": hardware.channels_last, "allocator_tuned": allocator_tuned,
              "native_bf16": runtime.cpu_has_native_bf16()}
    return {**result, **_ceiling_shares(result, flops, ceilings, hardware.amp_dtype)}


def _flops_per_image(torch, spec: dict, hardware, preprocess, levelled: np.ndarray) -> dict[str, float]:
    """FLOPs per training image and per inference image of lungdx's steps, on a fresh copy of the model.

    Counted over ``levelled`` (two images keep it cheap: the counts grow linearly with the batch);
    they depend on the shapes only, not on the precision or memory format.
    """
    from ceiling import count_flops

    from lungdx.predict import compute_logits, model_input
    from lungdx.train import optimizer_step

    model, optimizer, loss_fn = _train_tools(torch, spec["size"])
    model = hardware.prepare(model)
    target = torch.zeros(len(levelled), 1)

    def train_step():
        model.train()
        with hardware.autocast():
            logits = model(model_input(torch.from_numpy(levelled), preprocess, hardware))
        optimizer_step(loss_fn(logits.float(), target), optimizer, None)

    def infer():
        compute_logits(model, levelled, preprocess, hardware, len(levelled))

    return {"train": count_flops(train_step) / len(levelled), "inference": count_flops(infer) / len(levelled)}


CEILING_FLOPS = {"train_step": "train", "train_end_to_end": "train", "inference": "inference", "latency": "inference"}
"""Row of the ceiling table -> which FLOP count per image (training or inference) its images cost."""


def _ceiling_shares(result: dict, flops: dict[str, float], ceilings: dict[str, float], amp_dtype) -> dict:
    """Achieved GFLOP/s of each part and its share of the matmul ceiling of the precision it runs in."""
    from ceiling import cpu_model, precision_name

    precision = precision_name(amp_dtype)
    images_s = {"train_step": result["model_step_img_s"], "train_end_to_end": result["train_img_s"],
                "inference": result["infer_img_s"], "latency": 1000 / result["latency_ms"]}
    achieved = {part: rate * flops[CEILING_FLOPS[part]] / 1e9 for part, rate in images_s.items()}
    return {"cpu": cpu_model(), "precision": precision,
            "matmul_gflop_s": {name: rate / 1e9 for name, rate in ceilings.items()},
            "gflop_per_image": {name: count / 1e9 for name, count in flops.items()},
            "achieved_gflop_s": achieved,
            "ceiling_share": {part: value * 1e9 / ceilings[precision] for part, value in achieved.items()}}


LAYOUTS = ((False, False), (True, False), (False, True), (True, True))
"""(channels_last, bf16) combinations of the lever table; fp32 first, as bf16 is judged against it."""
SLOW_FACTOR = 2.0
"""A bf16 layout whose warm-up step is this much slower than fp32's is timed by that step alone."""


def worker_levers(spec: dict) -> dict:
    """lungdx's model step alone (no data loading) for each layout in ``spec["layouts"]``.

    The allocator setting is process-wide, so one process runs one setting; inside it the layouts
    take turns step by step, so that a change in the machine's load hits them all alike. A bf16
    layout is first tried on one image: where that predicts a training step over the budget (a
    kernel without native bf16 can be tens of times slower), it gets no full step at all.
    """
    from lungdx import runtime

    allocator_tuned = runtime.tune_allocator() if spec["tune_allocator"] else False
    torch = _setup_torch(spec)
    steps = {tuple(layout): _layout_steps(torch, spec, *layout) for layout in spec["layouts"]}
    results = {layout: {"train_s": [], "infer_s": [], "latency_s": None, "warmup_only": False} for layout in steps}
    active = []
    for (channels_last, bf16), (train_step, infer_step, forward_one) in steps.items():
        result = results[(channels_last, bf16)]
        result["latency_s"] = _latency(forward_one, spec["budget_s"])
        fp32 = results.get((channels_last, False)) if bf16 else None
        if fp32 and fp32["train_s"]:
            predicted_s = fp32["train_s"][0] * result["latency_s"] / fp32["latency_s"]
        else:
            predicted_s = 3 * spec["batch_size"] * result["latency_s"]  # a batch-1 forward is the slow side
        if bf16 and predicted_s > spec["budget_s"]:
            continue
        result["train_s"].append(_seconds(train_step))  # warm-up, dropped below unless it is the figure
        result["infer_s"].append(_seconds(infer_step))
        too_slow = fp32 and fp32["train_s"] and result["train_s"][0] > SLOW_FACTOR * fp32["train_s"][0]
        if too_slow or result["train_s"][0] > spec["budget_s"]:
            result["warmup_only"] = True
        else:
            active.append((channels_last, bf16))
    for _ in range(spec["steps"]):
        for layout in active:
            results[layout]["train_s"].append(_seconds(steps[layout][0]))
            results[layout]["infer_s"].append(_seconds(steps[layout][1]))
    for layout in active:  # drop the warm-up
        results[layout]["train_s"] = results[layout]["train_s"][1:]
        results[layout]["infer_s"] = results[layout]["infer_s"][1:]
    layouts = {_layout_key(*layout): result for layout, result in results.items()}
    return {"allocator_tuned": allocator_tuned, "layouts": layouts}


def _layout_key(channels_last: bool, bf16: bool) -> str:
    return f"{'channels_last' if channels_last else 'contiguous'}/{'bf16' if bf16 else 'fp32'}"


def _layout_steps(torch, spec: dict, channels_last: bool, bf16: bool):
    """Closures for one training step, one batch inference and a one-image forward."""
    from lungdx import runtime
    from lungdx.config import PreprocessConfig
    from lungdx.predict import model_input
    from lungdx.train import optimizer_step

    preprocess, batch_size = PreprocessConfig(size=spec["size"]), spec["batch_size"]
    # Set explicitly (not resolved from "auto"): the lever table times every combination.
    hardware = runtime.Hardware(torch.device("cpu"), torch.bfloat16 if bf16 else None, channels_last)
    model, optimizer, loss_fn = _train_tools(torch, spec["size"])
    model = hardware.prepare(model)
    levelled = torch.rand(batch_size, 1, spec["size"], spec["size"])
    target = (torch.arange(batch_size) % 2).float()[:, None]

    def train_step():
        model.train()
        images = model_input(levelled, preprocess, hardware)
        with hardware.autocast():
            logits = model(images)
        optimizer_step(loss_fn(logits.float(), target), optimizer, None)

    def forward(count: int):
        model.eval()
        with torch.inference_mode(), hardware.autocast():
            model(model_input(levelled[:count], preprocess, hardware))

    return train_step, lambda: forward(batch_size), lambda: forward(1)


def _latency(forward_one, budget_s: float) -> float:
    """Seconds of a one-image forward: the median of three after a warm-up, or the warm-up if slow."""
    first = _seconds(forward_one)
    if first > budget_s / 10:
        return first
    return statistics.median(_seconds(forward_one) for _ in range(3))


def _seconds(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


WORKERS = {"baseline": worker_baseline, "lungdx": worker_lungdx, "levers": worker_levers}


# ----------------------------------------------------------------------------------------------
# Driver.


def run_worker(name: str, spec: dict, timeout_s: float | None = None) -> dict | None:
    """Run one worker in a fresh interpreter; None when it ran past ``timeout_s``."""
    command = [sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec)]
    started = time.perf_counter()
    try:
        finished = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout_s, check=True)
    except subprocess.TimeoutExpired:
        _log(f"  stopped after {timeout_s:.0f} s")
        return None
    _log(f"  done in {time.perf_counter() - started:.0f} s")
    lines = [line for line in finished.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def run_levers(common: dict, args) -> dict:
    """The lever table's timings, keyed by (allocator tuned, layout key), over ``--lever-rounds`` rounds.

    Rounds alternate the order of the two allocator processes (ABBA), so that a drift in the
    machine's load does not favour one; later rounds repeat only the layouts timed in full.
    """
    merged = {(tuned, _layout_key(*layout)): {"train_s": [], "infer_s": [], "latency_s": [], "warmup_only": False}
              for tuned in (False, True) for layout in LAYOUTS}
    layouts = {False: list(LAYOUTS), True: list(LAYOUTS)}
    for round_index in range(args.lever_rounds):
        for tuned in (False, True) if round_index % 2 == 0 else (True, False):
            if not layouts[tuned]:
                continue
            _log(f"levers, round {round_index + 1}, {'tuned' if tuned else 'default'} allocator ...")
            spec = {**common, "tune_allocator": tuned, "layouts": layouts[tuned], "batch_size": args.lever_batch,
                    "steps": args.lever_steps, "budget_s": args.lever_budget}
            result = run_worker("levers", spec, timeout_s=args.lever_timeout)
            if result is None:
                continue
            for key, cell in result["layouts"].items():
                entry = merged[(tuned, key)]
                entry["train_s"] += cell["train_s"]
                entry["infer_s"] += cell["infer_s"]
                entry["latency_s"].append(cell["latency_s"])
                entry["warmup_only"] |= cell["warmup_only"]
            layouts[tuned] = [layout for layout in layouts[tuned] if merged[(tuned, _layout_key(*layout))]["train_s"]
                              and not merged[(tuned, _layout_key(*layout))]["warmup_only"]]
    return merged


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def pipeline_table(baseline: dict | None, lungdx: dict, args) -> list[str]:
    images = lungdx["images"]
    first_epoch = images / (lungdx["cache_s"] + images / lungdx["train_img_s"])
    base_train = baseline["train_img_s"] if baseline else None
    base_infer = baseline["infer_img_s"] if baseline else None
    autocast = "fp32" if lungdx["autocast"] == "None" else lungdx["autocast"].replace("torch.", "")
    layout = "channels_last" if lungdx["channels_last"] else "contiguous"
    rows = [
        "| pipeline | train img/s (steady) | ratio | train img/s, 1st epoch incl. decode | ratio "
        f"| inference img/s (batch {args.batch_size}) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    if baseline:
        rows.append(f"| hand-written: ImageFolder + PIL each epoch, DataLoader(num_workers={args.loader_workers}), "
                    f"eager fp32, default malloc | {_rate(base_train)} | 1.00x | {_rate(base_train)} | 1.00x "
                    f"| {_rate(base_infer)} | 1.00x |")
    rows.append(f"| lungdx: cache + augment, {layout}, {autocast}, tuned malloc "
                f"| {_rate(lungdx['train_img_s'])} | {_ratio(lungdx['train_img_s'], base_train)} "
                f"| {_rate(first_epoch)} | {_ratio(first_epoch, base_train)} "
                f"| {_rate(lungdx['infer_img_s'])} | {_ratio(lungdx['infer_img_s'], base_infer)} |")
    notes = [f"lungdx cache build (decode + level, {images} files, {args.threads} threads): "
             f"{lungdx['cache_s']:.1f} s = {images / lungdx['cache_s']:.1f} img/s."]
    if baseline:
        notes.append(f"baseline DataLoader alone, one epoch of decoding: {baseline['decode_img_s']:.1f} img/s.")
    notes.append("1st epoch for lungdx = images / (cache build + images / steady rate); "
                 "the baseline decodes every epoch, so its 1st epoch equals its steady rate.")
    return [*rows, "", *notes]


def ceiling_table(lungdx: dict, args) -> list[str]:
    """lungdx's training step, end-to-end training, inference and latency as GFLOP/s and shares of the ceiling."""
    precision, achieved, share = lungdx["precision"], lungdx["achieved_gflop_s"], lungdx["ceiling_share"]
    flops = lungdx["gflop_per_image"]
    ceilings = ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in lungdx["matmul_gflop_s"].items())
    layout = "channels_last" if lungdx["channels_last"] else "contiguous"
    batch = args.batch_size
    parts = {"train_step": (f"training step alone (model_input, forward, BCE, Adam; batch {batch})",
                            lungdx["model_step_img_s"]),
             "train_end_to_end": (f"training end to end (cache read, augment, step; batch {batch})", lungdx["train_img_s"]),
             "inference": (f"batch inference (`compute_logits`, batch {batch})", lungdx["infer_img_s"]),
             "latency": ("batch-1 latency (`compute_logits`, 1 image)", 1000 / lungdx["latency_ms"])}
    rows = [f"Matmul ceiling (2048x2048, {args.threads} threads, in the lungdx process): {ceilings}; native bf16: "
            f"{lungdx['native_bf16']}. lungdx runs {layout} in {precision} (`lungdx.runtime`'s choice for "
            f"--precision {args.precision}). paper_cnn at {args.size} px: {flops['train']:.2f} GFLOP per training image, "
            f"{flops['inference']:.2f} per inference image (FlopCounterMode: convolutions and matmuls).",
            "",
            f"| lungdx part | img/s | latency ms | GFLOP/s | share of the {precision} ceiling |",
            "|---|---:|---:|---:|---:|"]
    for part, (name, images_s) in parts.items():
        latency = f"{lungdx['latency_ms']:.1f}" if part == "latency" else "-"
        rows.append(f"| {name} | {images_s:.2f} | {latency} | {achieved[part]:.1f} | {share[part]:.0%} |")
    return rows


def lever_table(merged: dict, args) -> list[str]:
    batch = args.lever_batch
    reference = _lever_rates(merged[(False, _layout_key(False, False))], batch)
    rows = [f"| allocator | memory format | autocast | train img/s | ratio | inference img/s (batch {batch}) | ratio "
            "| 1-image forward ms | ratio | timed steps |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (tuned, key), entry in merged.items():
        layout, dtype = key.split("/")
        train, infer, latency = _lever_rates(entry, batch)
        flag = " (1 step)" if entry["warmup_only"] else ""
        if latency is None:
            cells = "no result (stopped) | - | - | - | - | -"
        elif train is None:
            cells = "not timed (too slow) | - | not timed | - | " \
                    f"{1000 * latency:.0f} | {_ratio(reference[2], latency)}"
        else:
            cells = (f"{train:.2f}{flag} | {_ratio(train, reference[0])} | {infer:.2f}{flag} "
                     f"| {_ratio(infer, reference[1])} | {1000 * latency:.0f} | {_ratio(reference[2], latency)}")
        rows.append(f"| {'tuned' if tuned else 'default'} | {layout} | {dtype} | {cells} | {len(entry['train_s'])} |")
    return rows


def _lever_rates(entry: dict, batch: int) -> tuple[float | None, float | None, float | None]:
    """(train img/s, inference img/s, one-image forward seconds) from the medians; None where missing."""
    train = batch / statistics.median(entry["train_s"]) if entry["train_s"] else None
    infer = batch / statistics.median(entry["infer_s"]) if entry["infer_s"] else None
    latency = statistics.median(entry["latency_s"]) if entry["latency_s"] else None
    return train, infer, latency


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](json.loads(args.spec))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    if args.size % 32:
        raise SystemExit("--size must be a multiple of 32 (paper_cnn pools five times)")
    load_before, begun = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lungdx-bench-") as tmp:
        root, source = prepare_images(args, Path(tmp))
        common = {"threads": args.threads, "size": args.size, "batch_size": args.batch_size, "root": str(root),
                  "warmup": 1, "steps": args.steps, "inference_repeats": args.steps,
                  "loader_workers": args.loader_workers}
        baseline = None
        if not args.skip_baseline:
            _log("baseline: hand-written pipeline ...")
            baseline = run_worker("baseline", common)
        _log("lungdx pipeline ...")
        lungdx = run_worker("lungdx", {**common, "cache_dir": str(Path(tmp) / "cache"),
                                       "precision": args.precision, "channels_last": args.channels_last})
        levers = None if args.skip_levers else run_levers(common, args)
    command = " ".join(["python bench/train_throughput.py", *(sys.argv[1:] if argv is None else argv)])
    print("\n".join(report(args, source, baseline, lungdx, levers, load_before,
                           time.perf_counter() - begun, command)))
    return 0


def prepare_images(args, tmp: Path) -> tuple[Path, str]:
    """The class folders both pipelines read, and a description of them."""
    started = time.perf_counter()
    root = tmp / "images"
    root.mkdir()
    if args.data:
        link_real_folder(Path(args.data), root, args.images)
        source = f"{args.data} (read-only, linked)"
    else:
        count = args.images or 128
        make_synthetic_folder(root, count, args.threads)
        source = f"{count} synthetic 1024x1024 8-bit PNG phantoms ({min(count, 32)} drawn, the rest copies)"
    paths, _ = list_images(root)
    if len(paths) < args.batch_size:
        raise SystemExit(f"{len(paths)} images is less than one batch of {args.batch_size}")
    _log(f"data ready in {time.perf_counter() - started:.1f} s: {len(paths)} images")
    return root, source


def report(args, source: str, baseline: dict | None, lungdx: dict, levers: dict | None,
           load_before: tuple[float, ...], seconds: float, command: str) -> list[str]:
    """The Markdown report."""
    import torch  # the driver only reads versions; all timing happens in the workers

    lines = [
        f"# paper_cnn throughput at {args.size} px",
        "",
        f"CPU: {lungdx['cpu']} ({os.cpu_count()} logical CPUs, torch capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {lungdx['native_bf16']}); "
        f"torch {torch.__version__}, {args.threads} threads; Python {platform.python_version()}.",
        f"Data: {source}. Batch {args.batch_size}, 1 warm-up + {args.steps} timed steps, medians.",
        f"Load average (1 min) before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}: "
        "other processes on the machine make these figures noisy.",
        "",
        "## Pipelines (training: data + augmentation + model step)",
        "",
        *pipeline_table(baseline, lungdx, args),
        "",
        "## Against the machine's ceiling (lungdx)",
        "",
        *ceiling_table(lungdx, args),
    ]
    if levers:
        lines += ["", f"## Levers: lungdx's model step alone, batch {args.lever_batch}", "",
                  *lever_table(levers, args), "",
                  f"Per allocator process: one warm-up, then {args.lever_steps} timed steps per layout, the layouts "
                  f"taking turns; {args.lever_rounds} rounds in ABBA order, medians over all rounds. Ratios against "
                  "the first row (default malloc, contiguous, fp32: the baseline's model step; for latency, "
                  "its time over this row's). 'not timed (too slow)': bf16's one-image forward predicted a training "
                  f"step over {args.lever_budget:.0f} s, so only that forward was timed. '(1 step)': the warm-up "
                  f"step alone is the figure, as it was over budget or over {SLOW_FACTOR:g}x fp32's."]
    return [*lines, "", f"Total wall time {seconds:.0f} s. Command: {command}"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", help="folder of real PNG/JPEG radiographs (read-only); default: synthetic phantoms")
    parser.add_argument("--images", type=int, default=None,
                        help="images to use (synthetic default 128; with --data default all)")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed training steps (and inference batches) after one warm-up")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="input height and width")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (and decode threads)")
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers of the baseline")
    parser.add_argument("--precision", default="auto", help="lungdx pipeline: auto, fp32 or bf16")
    parser.add_argument("--channels-last", default="auto", help="lungdx pipeline: auto or off")
    parser.add_argument("--lever-batch", type=int, default=16, help="batch size of the lever table")
    parser.add_argument("--lever-steps", type=int, default=2, help="timed steps per layout and round of the levers")
    parser.add_argument("--lever-rounds", type=int, default=2, help="rounds of the levers (allocators in ABBA order)")
    parser.add_argument("--lever-budget", type=float, default=20.0,
                        help="seconds: a layout whose (predicted) training step is slower is timed once or not at all")
    parser.add_argument("--lever-timeout", type=float, default=300.0,
                        help="seconds after which a lever process is stopped")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the hand-written pipeline")
    parser.add_argument("--skip-levers", action="store_true", help="do not run the lever table")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
