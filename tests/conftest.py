"""Shared fixtures. Real data is read in place from ../shared/data and never copied into the repo."""

import os
from pathlib import Path

import pytest


def _share_the_cpus_between_xdist_workers() -> None:
    """Under pytest-xdist (README's `pytest` runs one worker per CPU), each worker and the processes its tests
    start get their share of the CPUs instead of one thread per CPU each, unless OMP_NUM_THREADS is set."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


_share_the_cpus_between_xdist_workers()

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _shared_snapshot() -> dict[str, tuple[int, int]]:
    """Every file under ../shared/data: its size and modification time (1.5k files: 15-30 ms)."""
    found = {}
    for folder, _, files in os.walk(SHARED_DATA):  # nothing when it is absent
        for name in files:
            path = os.path.join(folder, name)
            try:
                stat = os.stat(path)
            except OSError:  # gone since it was listed: left out, so it shows as changed
                continue
            found[os.path.relpath(path, SHARED_DATA)] = (stat.st_size, stat.st_mtime_ns)
    return found


def _fail_if_shared_data_changed(seen: dict, by: str) -> None:
    """Fail naming ``by`` and the files when ../shared/data differs from ``seen["files"]``; then take it as seen, so
    that one change is blamed once, not on every later test."""
    before, after = seen["files"], _shared_snapshot()
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    seen["files"] = after
    if changed:
        pytest.fail(f"../shared/data was changed by {by} ({len(changed)} files, e.g. {', '.join(changed[:5])}): "
                    "tests must read it in place and write only under tmp_path", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _shared_data_left_as_found():
    """The shared data are read in place, never written: a test that moves, deletes or touches one of its files
    (a PACS node keeping a failed instance did, once) fails here, naming the files, instead of leaving the next
    session without them. Checked after each test that uses the ``shared_data`` fixture, and at the session's end
    for any test that reached the folder without it."""
    seen = {"files": _shared_snapshot()}
    yield seen
    _fail_if_shared_data_changed(seen, "a test or fixture that reached it without the shared_data fixture")


@pytest.fixture(autouse=True)
def _shared_data_left_as_found_by_this_test(request, _shared_data_left_as_found):
    yield
    # Only the tests that use it (or a fixture built on it: jsrt_dir, dicom_dir, ...) pay for a listing. Compared
    # with the last check, so a module fixture that wrote there is caught at its first test too. Under pytest-xdist
    # a test of another worker may have made the change while this one ran.
    if "shared_data" in request.fixturenames:
        _fail_if_shared_data_changed(_shared_data_left_as_found, f"{request.node.nodeid} or a fixture it uses")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data``; skips the test with the reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not found: real-data tests need the shared data folder beside the repository")
    return SHARED_DATA


def _shared_folder(shared_data: Path, name: str, marker: str, why: str) -> Path:
    folder = shared_data / name
    if not (folder / marker).is_file():
        pytest.skip(f"../shared/data/{name} not found: {why}")
    return folder


@pytest.fixture(scope="session")
def jsrt_dir(shared_data: Path) -> Path:
    """The JSRT folder (labels.csv layout); skips when absent."""
    return _shared_folder(shared_data, "jsrt", "labels.csv", "JSRT tests need the JSRT folder (not redistributable)")


@pytest.fixture(scope="session")
def dicom_dir(shared_data: Path) -> Path:
    """The real DICOM samples; skips when absent."""
    return _shared_folder(shared_data, "dicom_samples", "files.csv", "DICOM tests need the sample folder")


@pytest.fixture(scope="session")
def nih_dir(shared_data: Path) -> Path:
    """The NIH ChestX-ray14 64 px subset; skips when absent."""
    return _shared_folder(shared_data, "nih_cxr14_64px_subset", "labels.csv", "NIH tests need the subset folder")


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small synthetic phantom dataset (JSRT labels.csv layout), made once per test session."""
    from lungdx.data.phantoms import write_phantom_dataset

    folder = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(folder, 72, size=128, seed=0)
    return folder


def tiny_config(data_dir, cache_dir, *overrides):
    """A fast configuration for tests: 64 px, a narrow paper_cnn, two epochs."""
    from lungdx.config import apply_overrides, load_config

    base = [f"data.path={data_dir}", f"data.cache_dir={cache_dir}", "data.task=malignant_vs_rest",
            "preprocess.size=64", "model.kwargs={widths: [8, 8, 16, 16, 16], hidden: 16}",
            "train.epochs=2", "train.batch_size=16", "train.patience=5",
            # fp32 pinned: `auto` picks bf16 on CPUs with AVX512-BF16/AMX, fp32 elsewhere; tests that compare
            # saved scores with recomputed ones need the same arithmetic on both kinds of CI machine.
            "train.precision=fp32"]
    return apply_overrides(load_config(), base + list(overrides))


@pytest.fixture(scope="session")
def trained_run(phantom_dir, tmp_path_factory) -> Path:
    """A tiny model trained on the phantoms (64 px, two epochs): a run folder with ``model.pt``.

    Shared by the service, PACS and monitoring tests, which need a real checkpoint, not a good one.
    """
    from lungdx.train import fit

    folder = tmp_path_factory.mktemp("trained")
    return fit(tiny_config(phantom_dir, folder / "cache"), folder / "run").run_dir
