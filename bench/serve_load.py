"""Load on ``lungdx serve`` over loopback: requests/s and p50/p95 latency, micro-batching on and off.

Both settings run in the same invocation, each against its own server process on 127.0.0.1, on
the same images and with the same number of concurrent clients; the batching-on throughput is
also given as a ratio against batching off (``--max-batch 1``) measured in the same run. A
concurrent warm-up round comes first; the server's resident memory is read from ``/proc`` before
and after the measured round, to show that it is stable under load. Runs on a busy machine are
noisy: the load average is printed with the results.

Usage::

    python bench/serve_load.py                                   # untrained paper_cnn at 256 px, 512 px PNG phantoms
    python bench/serve_load.py --run runs/jsrt-mal-256 --images ../shared/data/jsrt/images \
        --limit 20
    python bench/serve_load.py --clients 16 --requests 400 --max-batch 32
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoadResult:
    """What one load run measured."""

    requests: int
    failures: int
    seconds: float
    latencies_s: list[float]
    statuses: dict[int, int]
    rss_warm_mb: float | None
    rss_end_mb: float | None

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run: Path, port: int, *, max_batch: int, max_wait_ms: float = 5.0, extra: list[str] = (),
                 env: dict | None = None, timeout_s: float = 120.0) -> subprocess.Popen:
    """``lungdx serve`` in its own process, returned once ``/readyz`` answers 200.

    ``extra`` options come last, so they override the defaults here (``--db none``).
    """
    import httpx

    command = [sys.executable, "-m", "lungdx.cli", "-q", "serve", str(run), "--port", str(port), "--db", "none",
               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), *extra]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"the server was not ready within {timeout_s} s")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process (Linux ``/proc``), None elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_load(url: str, images: list[bytes], *, clients: int, requests: int, pid: int | None = None,
             timeout_s: float = 60.0) -> LoadResult:
    """``clients`` threads post ``requests`` images in all (round robin over ``images``) and time each answer.

    With ``pid``, the server's resident memory is read before and after.
    """
    import httpx

    rss_warm = rss_mb(pid) if pid else None
    lock, latencies, statuses, counter = threading.Lock(), [], {}, iter(range(requests))

    def client():
        with httpx.Client(timeout=timeout_s) as session:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                start = time.perf_counter()
                try:
                    status = session.post(url, files={"file": ("image", images[index % len(images)])}).status_code
                except httpx.HTTPError:
                    status = 0
                with lock:
                    latencies.append(time.perf_counter() - start)
                    statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    failures = sum(count for status, count in statuses.items() if status != 200)
    return LoadResult(requests, failures, seconds, latencies, statuses, rss_warm, rss_mb(pid) if pid else None)


def untrained_run(folder: Path, size: int) -> Path:
    """A run folder with an untrained ``paper_cnn``: speed does not depend on what the weights learnt."""
    from lungdx.checkpoint import save_checkpoint
    from lungdx.config import PreprocessConfig, to_dict
    from lungdx.models import create_model

    model = create_model("paper_cnn")
    preprocess = to_dict(PreprocessConfig(size=size))
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "model.pt", model, model_name="paper_cnn", model_kwargs={}, preprocess=preprocess,
                    task="malignant_vs_rest", class_names=["not malignant", "malignant"], threshold=0.5)
    return folder


def phantom_pngs(folder: Path, count: int, size: int) -> list[Path]:
    from lungdx.data.phantoms import write_phantom_dataset

    write_phantom_dataset(folder, count, size=size, seed=0)
    return sorted((folder / "images").glob("*.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run folder to serve (default: an untrained paper_cnn)")
    parser.add_argument("--size", type=int, default=256, help="input size of the untrained model (default: %(default)s)")
    parser.add_argument("--images", type=Path, help="folder of PNG/JPEG/DICOM images (default: phantoms)")
    parser.add_argument("--image-size", type=int, default=512, help="phantom size in px (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=16, help="images to cycle through (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-batch", type=int, default=16, help="batch size for the batching-on server")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lungdx-serve-bench-") as scratch:
        scratch = Path(scratch)
        run = args.run or untrained_run(scratch / "run", args.size)
        if args.images:
            files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
        else:
            files = phantom_pngs(scratch / "phantoms", args.limit, args.image_size)
        images = [path.read_bytes() for path in files[: args.limit]]
        print(f"lungdx serve load: {len(images)} images ({sum(map(len, images)) / len(images) / 1024:.0f} KiB each on "
              f"average), {args.clients} clients, {args.requests} requests, run {run}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        results = {}
        for label, max_batch in (("batching off (--max-batch 1)", 1), (f"batching on (--max-batch {args.max_batch})", args.max_batch)):
            port = free_port()
            server = start_server(run, port, max_batch=max_batch, max_wait_ms=args.max_wait_ms)
            url = f"http://127.0.0.1:{port}/v1/predictions"
            try:  # a concurrent warm-up round first, so the memory figures compare like with like
                run_load(url, images, clients=args.clients, requests=max(args.clients * 4, args.requests // 4))
                results[label] = run_load(url, images, clients=args.clients, requests=args.requests, pid=server.pid)
            finally:
                stop_server(server)
        print("\n| setting | requests/s | p50 ms | p95 ms | failed | RSS before MB | RSS after MB |\n|---|---|---|---|---|---|---|")
        for label, result in results.items():
            print(f"| {label} | {result.per_second:.1f} | {result.percentile_ms(50):.0f} | {result.percentile_ms(95):.0f} | "
                  f"{result.failures} | {result.rss_warm_mb or float('nan'):.0f} | {result.rss_end_mb or float('nan'):.0f} |")
        off, on = results.values()
        print(f"\nthroughput ratio, batching on / off: {on.per_second / off.per_second:.2f}x "
              f"(load average after: {os.getloadavg()[0]:.1f})")
        return 1 if any(result.failures for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
