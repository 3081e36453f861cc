"""The CPU backend lets Megatron-Core's CUDA-assuming calls run on CPU."""

import pytest
import torch

from eve_megatron import cpu_backend

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")


def test_cuda_requests_land_on_cpu():
    assert cpu_backend.activate()
    t = torch.zeros(3, device="cuda")
    assert t.device.type == "cpu"
    assert t.cuda() is t
    assert t.type() == "torch.cuda.FloatTensor"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.cuda.current_device() == "cpu"


def test_megatron_rng_tracker_forks_and_restores():
    from megatron.core import tensor_parallel

    cpu_backend.activate()
    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the tracked stream advanced
    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)  # reseeding reproduces it
