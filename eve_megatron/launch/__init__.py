"""Run a function on several local ranks (NCCL on GPU, gloo on CPU), the way torchrun would.

Used by the multi-rank tools (``import_hf.py``), the benchmarks and the distributed
tests: one helper picks a free port, starts
one process per rank with torchrun's environment variables, waits with a timeout and
always tears every rank down (its whole process group), also on failure.

    results = run_distributed("tests.distributed.workers:check_tp", world_size=2, tp=2)

The target is ``"module:function"``; it is called as ``function(**kwargs)`` on every rank
after ``parallel.init_distributed`` (rank ``r`` on GPU ``r``), and its return value (anything ``torch.save``
can store) comes back in a list indexed by rank.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, List

from eve_megatron.parallel import free_port


class DistributedRunError(RuntimeError):
    """A rank failed, or the run timed out; the message holds the failing ranks' stderr."""


def run_distributed(target: str, world_size: int, timeout: float = 600, **kwargs) -> List[Any]:
    """Run ``target(**kwargs)`` on ``world_size`` ranks and return each rank's result."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="eve_dist_") as tmp:
        args_path = os.path.join(tmp, "kwargs.pkl")
        with open(args_path, "wb") as f:
            pickle.dump(kwargs, f)
        procs = []
        env_base = dict(os.environ)
        env_base["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env_base.setdefault("OMP_NUM_THREADS", "1")
        try:
            for rank in range(world_size):
                env = dict(env_base)
                env.update(
                    RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                    LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                )
                out = open(os.path.join(tmp, f"rank{rank}.log"), "wb")
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "eve_megatron.launch.worker", target, args_path,
                     os.path.join(tmp, f"rank{rank}.result")],
                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                ))
                out.close()
            _wait_all(procs, timeout, tmp)
            results = []
            for rank in range(world_size):
                with open(os.path.join(tmp, f"rank{rank}.result"), "rb") as f:
                    results.append(pickle.load(f))
            return results
        finally:
            for proc in procs:
                _kill_group(proc)


def _wait_all(procs, timeout: float, tmp: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            time.sleep(0.5)  # give the other ranks a moment to print their side
            raise DistributedRunError(_report(f"rank(s) {failed} failed", failed, tmp))
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            pending = [r for r, c in enumerate(codes) if c is None]
            raise DistributedRunError(_report(f"timeout after {timeout}s", pending, tmp))
        time.sleep(0.05)


def _report(headline: str, ranks, tmp: str) -> str:
    parts = [headline]
    for rank in ranks:
        path = os.path.join(tmp, f"rank{rank}.log")
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
        parts.append(f"--- rank {rank} output (last 6000 chars) ---\n{text[-6000:]}")
    return "\n".join(parts)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the rank's whole process group, also when the rank itself already exited:
    helpers it started (e.g. a multiprocessing manager) must not outlive the run."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
