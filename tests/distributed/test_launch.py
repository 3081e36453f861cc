"""The launcher every multi-rank tool uses: ranks start like torchrun's, each on its own device."""

import pytest
import torch

from eve_megatron.launch import DistributedRunError, run_distributed

W = "tests.distributed.launch_workers"


def test_ranks_start_with_the_right_backend():
    res = run_distributed(f"{W}:where_am_i", 2)
    assert [r["rank"] for r in res] == [0, 1] == [r["local_rank"] for r in res]
    assert {r["backend"] for r in res} == {"nccl" if torch.cuda.is_available() else "gloo"}
    with pytest.raises(DistributedRunError, match="no_such_function"):
        run_distributed(f"{W}:no_such_function", 1)


@pytest.mark.gpu
def test_each_rank_gets_its_own_gpu():
    """The defect fixed: ranks started by the launcher used to all land on cuda:0."""
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip("needs two GPUs to tell the ranks' devices apart")
    res = run_distributed(f"{W}:where_am_i", n)
    assert [r["device"] for r in res] == list(range(n))
