"""Shared fixtures: the synthetic example dataset and the real scans in ../shared/data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qid2_bidsapp.data.example import make_example_dataset

REPO = Path(__file__).resolve().parents[1]
REAL_BIDS = REPO.parent / "shared" / "data" / "bids-real"


@pytest.fixture(scope="session")
def example_bids_ro(tmp_path_factory) -> Path:
    """The bundled example dataset (read-only by convention: copy before changing it)."""
    return make_example_dataset(tmp_path_factory.mktemp("example") / "bids")


@pytest.fixture
def example_bids(example_bids_ro, tmp_path) -> Path:
    """A private, writable copy of the example dataset."""
    return Path(shutil.copytree(example_bids_ro, tmp_path / "bids"))


@pytest.fixture(scope="session")
def real_bids() -> Path:
    """The real multi-scanner dataset; skipped when ../shared/data is absent."""
    if not (REAL_BIDS / "dataset_description.json").exists():
        pytest.skip(f"{REAL_BIDS} not present (real-data tests need ../shared/data)")
    return REAL_BIDS


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a test module's torch code on one thread (restored afterwards).

    Tiny tensors: one thread is as fast, and far faster on a loaded 2-core machine.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A model folder holding the tiny preset with random weights (needs torch and MONAI)."""
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    from .helpers import save_tiny_random_model

    return save_tiny_random_model(tmp_path_factory.mktemp("models") / "tiny")
