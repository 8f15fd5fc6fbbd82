"""Shared fixtures. Real data is read in place from ../shared/data and never copied into the repo."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data``; skips the test with the reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not found: real-data tests need the shared data folder beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def jsrt_dir(shared_data: Path) -> Path:
    """The JSRT folder (labels.csv layout); skips when absent."""
    folder = shared_data / "jsrt"
    if not (folder / "labels.csv").is_file():
        pytest.skip("../shared/data/jsrt not found: JSRT tests need the JSRT folder (not redistributable)")
    return folder
