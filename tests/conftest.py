"""Shared fixtures: seeded generators and locations of the bundled and shared datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "sunnybrook_lv"
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def key() -> bytes:
    return bytes(range(32))


def shared_dataset(name: str) -> Path:
    p = SHARED_DATA / name
    if not (p / "images").is_dir():
        pytest.skip(f"shared dataset {name!r} not available at {p}")
    return p
