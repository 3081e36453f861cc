"""Build the model chunks of this rank and wrap them for data parallelism."""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)

from eve_megatron.models.eve import EVEConfig, EVEModel
from eve_megatron.models.eve.config import model_class


def build_model_chunks(config: EVEConfig) -> List[EVEModel]:
    """One chunk per virtual pipeline stage of this rank (one chunk without interleaving)."""
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if vp is None else list(range(vp))
    cls = model_class(config)  # the family's model: EVEModel, EVEv1Model, ...
    chunks = [cls(config, vp_stage=stage) for stage in stages]
    if torch.cuda.is_available():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    if config.bf16:
        chunks = [c.bfloat16() for c in chunks]
    return chunks


def wrap_ddp(chunks: List[EVEModel], config: EVEConfig,
             ddp_config: Optional[DistributedDataParallelConfig] = None
             ) -> List[DistributedDataParallel]:
    """Megatron DDP around every chunk, and the config hooks the schedules need.

    Sets ``no_sync_func`` (gradient reduction only after the last micro-batch),
    ``grad_sync_func`` (overlap with the pipeline) and ``finalize_model_grads_func``
    (DP/SP/embedding reductions and the division by the global token count).
    """
    ddp_config = ddp_config or DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False)
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]
    no_sync = [m.no_sync for m in wrapped]
    grad_sync = [m.start_grad_sync for m in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if ddp_config.overlap_grad_reduce:
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped
