"""Process groups: the parallel layout config and its one-call initialisation."""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


@dataclass
class ParallelConfig:
    """How the ranks are laid out (Megatron-Core names; help texts in the field metadata)."""

    tensor_model_parallel_size: int = field(default=1, metadata={
        "help": "ranks that split every weight matrix (column/row parallel linears)"})
    pipeline_model_parallel_size: int = field(default=1, metadata={
        "help": "ranks that split the decoder layers into stages"})
    virtual_pipeline_model_parallel_size: Optional[int] = field(default=None, metadata={
        "help": "model chunks per pipeline rank (interleaved 1F1B); None disables interleaving"})
    sequence_parallel: bool = field(default=False, metadata={
        "help": "shard norms, residuals and dropout along the sequence over the TP group"})

    def validate(self, world_size: Optional[int] = None) -> None:
        """Raise ValueError with a clear message on an impossible layout."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError(f"tensor/pipeline parallel sizes must be >= 1, got TP={tp} PP={pp}")
        if world_size is not None and world_size % (tp * pp) != 0:
            raise ValueError(f"world size {world_size} is not divisible by TP*PP = {tp * pp}")
        if self.sequence_parallel and tp == 1:
            raise ValueError("sequence_parallel needs tensor_model_parallel_size > 1")
        vp = self.virtual_pipeline_model_parallel_size
        if vp is not None and (vp < 1 or pp < 2):
            raise ValueError("virtual_pipeline_model_parallel_size needs PP >= 2 and a value >= 1")

    def data_parallel_size(self, world_size: int) -> int:
        """Number of data-parallel replicas for a world of ``world_size`` ranks."""
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)


def set_random_seed(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's model-parallel RNG tracker.

    Must run after :func:`initialize_parallel`; tensor-parallel ranks get distinct
    tracker seeds, every other generator gets the same seed on every rank.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_distributed(timeout_minutes: int = 10) -> None:
    """Start the default process group of this process, the one way every entry point does.

    On GPU the device is set from ``LOCAL_RANK`` first (NCCL then binds each rank to its
    own GPU); on CPU :mod:`eve_megatron.cpu_backend` is activated and gloo is used. Under
    torchrun (or :func:`eve_megatron.launch.run_distributed`) the env rendezvous is used;
    a single process without that env becomes a world of one (no port needed).
    """
    from eve_megatron import cpu_backend, mcore_compat  # noqa: F401 (checks the release)

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        cpu_backend.activate()
    if torch.distributed.is_initialized():
        return
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
    else:
        torch.distributed.init_process_group(
            backend=backend, timeout=timeout, store=torch.distributed.HashStore(),
            rank=0, world_size=1)


def initialize_parallel(
    parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 10
) -> None:
    """Initialise torch.distributed (from torchrun's env) and Megatron-Core's groups.

    Uses NCCL on GPU and gloo on CPU, where it also activates :mod:`eve_megatron.cpu_backend`.
    A single process without torchrun env becomes a world of one.
    """
    from megatron.core import parallel_state

    init_distributed(timeout_minutes)
    parallel.validate(torch.distributed.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
    )
    set_random_seed(seed)


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, for a rendezvous.

    Chosen outside the kernel's ephemeral range when possible: a port from that range can
    be handed to some process's outgoing connection between this check and the bind
    (EADDRINUSE in a busy test run, where gloo opens many connections).
    """
    import random
    import socket

    low, high = 32768, 60999
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        pass
    candidates = [p for p in random.sample(range(10000, 65000), 200) if not low <= p <= high]
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
