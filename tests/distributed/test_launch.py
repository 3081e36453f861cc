"""The launcher every multi-rank tool uses: ranks start like torchrun's, each on its own device."""

import time

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


def test_nothing_a_rank_started_outlives_the_run(tmp_path):
    """A rank killed by SIGKILL leaves no helper behind (its process group is reaped, and the
    checkpoint writer's manager dies with its parent)."""
    import psutil

    pid_file = str(tmp_path / "helper.pid")
    with pytest.raises(DistributedRunError, match="failed"):
        run_distributed(f"{W}:helper_then_die", 1, pid_file=pid_file)
    helper = int(open(pid_file).read())
    deadline = time.time() + 10
    while psutil.pid_exists(helper) and time.time() < deadline:
        try:
            if psutil.Process(helper).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    assert not psutil.pid_exists(helper) or psutil.Process(helper).status() == psutil.STATUS_ZOMBIE


@pytest.mark.gpu
def test_each_rank_gets_its_own_gpu():
    """The defect fixed: ranks started by the launcher used to all land on cuda:0."""
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip("needs two GPUs to tell the ranks' devices apart")
    res = run_distributed(f"{W}:where_am_i", n)
    assert [r["device"] for r in res] == list(range(n))
