"""Shared fixtures: seeded generators and locations of the bundled and shared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "sunnybrook_lv"
SHARED_DATA = REPO.parent / "shared" / "data"

# Two torch threads, the project's 2-core machines; under pytest-xdist (make test runs two workers) each worker gets
# its share of the cores instead, so two workers never run four threads on two cores.
torch.set_num_threads(max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny networks: several times faster than two on a shared 2-core machine, as each
    SuperNode uses); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def key() -> bytes:
    return bytes(range(32))


def shared_dataset(name: str) -> Path:
    p = SHARED_DATA / name
    if not (p / "images").is_dir():
        pytest.skip(f"shared dataset {name!r} not available at {p}")
    return p


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line or environment mentions ``text`` (e.g. a run folder)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            blob = (d / "cmdline").read_bytes() + (d / "environ").read_bytes()
        except (OSError, IndexError):
            continue
        if state != "Z" and text.encode() in blob:
            found.append(int(d.name))
    return found
