"""Load on ``lungdx serve`` over loopback: requests/s and p50/p95 latency, micro-batching and monitoring on and off.

Three settings run in the same invocation, each against its own server process on 127.0.0.1, on
the same images and with the same number of concurrent clients: batching off (``--max-batch 1``,
``--db none``), batching on (``--db none``) and the default configuration, batching and monitoring
on (``--db sqlite:///...`` in a temporary folder). Batching on is given as a ratio against batching
off, monitoring on as a ratio against ``--db none``, each measured in the same run. The servers run
side by side: a concurrent warm-up round each, then ``--rounds`` measured rounds per server taking
turns in alternating order, one server loaded at a time, so that a change in the machine's load hits
every setting alike. Each server's resident memory is read from ``/proc`` when it is ready, after
its warm-up and after its last measured round, to show that it is stable under load. With
monitoring on, the log is checked to hold one row per answered prediction. Runs on a busy machine
are noisy: the load average is printed with the results.

Usage::

    python bench/serve_load.py                                   # untrained paper_cnn at 256 px, 512 px PNG phantoms
    python bench/serve_load.py --run runs/jsrt-mal-256 --images ../shared/data/jsrt/images \
        --limit 20
    python bench/serve_load.py --clients 16 --requests 400 --max-batch 32
    python bench/serve_load.py --skip-batching-off --archive       # monitoring on/off only; also archive images
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
    rss_ready_mb: float | None = None
    cpu_s: float | None = None
    logged: int | None = None

    @property
    def cpu_ms_per_request(self) -> float:
        """The server's CPU time (all threads, user + system) per request: steadier than requests/s on a busy machine."""
        return 1000 * self.cpu_s / self.requests if self.cpu_s is not None and self.requests else float("nan")

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
                 env: dict | None = None, timeout_s: float = 120.0, precision: str = "checkpoint") -> subprocess.Popen:
    """``lungdx serve`` in its own process, returned once ``/readyz`` answers 200.

    ``precision``: serve's ``--precision`` (its default, ``checkpoint``, since 2026-12-07; the rows measured before
    that served in ``auto``, bf16 on a CPU with native bf16).

    ``extra`` options come last, so they override the defaults here (``--db none``).
    """
    import httpx

    command = [sys.executable, "-m", "lungdx.cli", "-q", "serve", str(run), "--port", str(port), "--db", "none",
               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--precision", precision, *extra]
    # stderr goes to a file, not a pipe: a pipe nobody reads fills after 64 KiB of log and blocks the server.
    log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True, env={**os.environ, **(env or {})})
    server.log = log
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {server_log(server)[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"the server was not ready within {timeout_s} s")


def server_log(server: subprocess.Popen) -> str:
    """What the server wrote to stderr so far."""
    server.log.flush()
    server.log.seek(0)
    return server.log.read()


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM (a clean stop: the lifespan's shutdown runs, the monitoring queue is written), then wait."""
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux ``/proc``), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15 of stat


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

    rss_warm, cpu_start = (rss_mb(pid), cpu_seconds(pid)) if pid else (None, None)
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
    cpu_end = cpu_seconds(pid) if pid else None
    return LoadResult(requests, failures, seconds, latencies, statuses, rss_warm, rss_mb(pid) if pid else None,
                      cpu_s=cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None)


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


def logged_rows(base: str) -> int:
    """Rows the server's monitoring log holds for its model (the summary waits for its write-behind queue)."""
    import httpx

    return httpx.get(f"{base}/v1/monitor/summary", params={"since": "all"}, timeout=60).json()["volume"]["current_model_total"]


def combine(parts: list[LoadResult], rss_ready_mb: float | None) -> LoadResult:
    """One setting's measured rounds as one result: memory from the first round's start to the last round's end."""
    statuses: dict[int, int] = {}
    for part in parts:
        for status, count in part.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    return LoadResult(sum(p.requests for p in parts), sum(p.failures for p in parts), sum(p.seconds for p in parts),
                      [latency for p in parts for latency in p.latencies_s], statuses, parts[0].rss_warm_mb,
                      parts[-1].rss_end_mb, rss_ready_mb,
                      sum(p.cpu_s for p in parts) if all(p.cpu_s is not None for p in parts) else None)


def measure(run: Path, images: list[bytes], args, settings: list[tuple[str, int, list[str]]]) -> dict[str, LoadResult]:
    """Every setting's server at once; a concurrent warm-up round each, then measured rounds taking turns.

    Only one server is loaded at a time (an idle one costs no CPU); taking turns in short rounds, in
    alternating order, lets a change in the machine's load hit every setting alike.
    """
    servers = {}
    try:
        for label, max_batch, extra in settings:
            port = free_port()
            servers[label] = (start_server(run, port, max_batch=max_batch, max_wait_ms=args.max_wait_ms, extra=extra,
                                           precision=args.precision),
                              f"http://127.0.0.1:{port}/v1/predictions")
        ready = {label: rss_mb(server.pid) for label, (server, _) in servers.items()}
        warm_answered = {label: run_load(url, images, clients=args.clients, requests=max(args.clients * 4, args.requests // 4))
                         .statuses.get(200, 0) for label, (_, url) in servers.items()}
        rounds: dict[str, list[LoadResult]] = {label: [] for label in servers}
        for index in range(args.rounds):
            for label in (list(servers) if index % 2 == 0 else list(servers)[::-1]):
                server, url = servers[label]
                rounds[label].append(run_load(url, images, clients=args.clients, pid=server.pid,
                                              requests=max(args.clients, args.requests // args.rounds)))
        results = {label: combine(parts, ready[label]) for label, parts in rounds.items()}
        for (label, _, extra), result in zip(settings, results.values(), strict=True):
            if "--db" in extra:
                result.logged = logged_rows(servers[label][1].removesuffix("/v1/predictions"))
                answered = warm_answered[label] + result.statuses.get(200, 0)
                if result.logged != answered:
                    print(f"warning: {answered} predictions answered, {result.logged} logged")
    finally:
        for server, _ in servers.values():
            stop_server(server)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run folder to serve (default: an untrained paper_cnn)")
    parser.add_argument("--size", type=int, default=256, help="input size of the untrained model (default: %(default)s)")
    parser.add_argument("--images", type=Path, help="folder of PNG/JPEG/DICOM images (default: phantoms)")
    parser.add_argument("--image-size", type=int, default=512, help="phantom size in px (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=16, help="images to cycle through (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-batch", type=int, default=16, help="batch size for the batching-on servers")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--skip-batching-off", action="store_true", help="measure only monitoring on and off")
    parser.add_argument("--archive", action="store_true", help="monitoring on also archives every image (--archive DIR)")
    parser.add_argument("--precision", default="checkpoint",
                        help="serve's --precision: checkpoint (its default) or auto, as the rows before 2026-12-07 ran "
                             "(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds per setting, taking turns (default: %(default)s)")
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
        monitoring = ["--db", f"sqlite:///{scratch / 'monitor.db'}"] + (["--archive", str(scratch / "archive")]
                                                                        if args.archive else [])
        settings = [] if args.skip_batching_off else [("batching off (--max-batch 1, --db none)", 1, [])]
        settings += [(f"batching on (--max-batch {args.max_batch}, --db none)", args.max_batch, []),
                     (f"batching and monitoring on (--max-batch {args.max_batch}, --db sqlite"
                      f"{', --archive' if args.archive else ''})", args.max_batch, monitoring)]
        results = measure(run, images, args, settings)
        print("\n| setting | requests/s | p50 ms | p95 ms | failed | CPU ms/request | RSS ready MB | RSS warm MB | RSS after MB "
              "| growth MB |\n|---|---|---|---|---|---|---|---|---|---|")
        nan = float("nan")
        for label, result in results.items():
            growth = (result.rss_end_mb - result.rss_warm_mb) if result.rss_end_mb and result.rss_warm_mb else nan
            print(f"| {label} | {result.per_second:.1f} | {result.percentile_ms(50):.0f} | {result.percentile_ms(95):.0f} | "
                  f"{result.failures} | {result.cpu_ms_per_request:.1f} | {result.rss_ready_mb or nan:.0f} | "
                  f"{result.rss_warm_mb or nan:.0f} | "
                  f"{result.rss_end_mb or nan:.0f} | {growth:+.0f} |")
        *_, off, on = results.values()
        if not args.skip_batching_off:
            print(f"\nthroughput ratio, batching on / off: {off.per_second / next(iter(results.values())).per_second:.2f}x")
        print(f"throughput ratio, monitoring on / off (--db none): {on.per_second / off.per_second:.2f}x (CPU time per request "
              f"{on.cpu_ms_per_request / off.cpu_ms_per_request:.2f}x); {on.logged} "
              f"predictions logged, one per answer (load average after: {os.getloadavg()[0]:.1f})")
        return 1 if any(result.failures for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
