"""Shared fixtures: tiny random MoE models of every router family (built once per session)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One torch thread unless told otherwise: the tiny models gain nothing from a second one, and with several test
# processes on a few cores extra OpenMP threads only spin.
torch.set_num_threads(int(os.environ.get("EXPERTSCOPE_TEST_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))))

from expertscope.testing import TINY_BUILDERS, tiny_model  # noqa: E402

FAMILIES = sorted(TINY_BUILDERS)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Pin torch to one thread for a module: with the CPU shared, two OpenMP threads spin-wait (~50x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_cache() -> dict:
    return {}


@pytest.fixture
def make_tiny(tiny_cache: dict):
    """``make_tiny(family, dtype=torch.float32, **config)``: a cached tiny model (do not mutate weights)."""

    def make(family: str, dtype: torch.dtype = torch.float32, **config):
        key = (family, dtype, tuple(sorted(config.items())))
        if key not in tiny_cache:
            tiny_cache[key] = tiny_model(family, seed=0, dtype=dtype, **config)
        return tiny_cache[key]

    return make
