"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="session")
def megatron_world():
    """Megatron-Core process groups for a single process (world of 1, gloo on CPU)."""
    from eve_megatron.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig())
    yield


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
