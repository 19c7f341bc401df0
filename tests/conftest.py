"""Test setup: CPU runs go through Triton's interpreter; `gpu` tests need CUDA and real sizes."""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before tritonize (and so triton.jit) is imported: every kernel then runs on CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never read or write the user's tuning cache: misses use the shapes' heuristics or the shipped table.
os.environ["TRITONIZE_TUNING_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="tritonize-tests-"), "tuning.json")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run; the seed is printed on failure so a case can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    yield seed


@pytest.fixture
def graph_captures(monkeypatch) -> list:
    """Every CUDA graph capture begun from now on (torch.cuda.CUDAGraph counts its capture_begin calls)."""
    captures = []

    class CountedGraph(torch.cuda.CUDAGraph):
        def capture_begin(self, *args, **kwargs):
            captures.append(self)
            return super().capture_begin(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", CountedGraph)
    return captures
