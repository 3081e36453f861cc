"""What a training checkpoint holds beyond the weights, and how a run resumes from it.

    model ...                  sharded weights (checkpointing.py)
    optimizer                  Megatron DistributedOptimizer state, 'fully_reshardable'
                               (loads under any TP/PP/DP layout)
    rng_state                  python/numpy/torch/CUDA generators + Megatron's RNG tracker,
                               one ShardedObject per (PP, TP) rank, replicated over DP
    opt_param_scheduler        OptimizerParamScheduler.state_dict() (common)
    train_state                iteration, consumed samples, counters, layout, config (common)

A checkpoint without ``train_state`` is "model-only" (written by a conversion or the
copy tool, or with ``--no-save-optim``); a run loads it like ``--finetune``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from eve_megatron import mcore_compat

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                  "chained_optim_avoid_prefix": True, "singleton_local_shards": False}
"""Sharded-state metadata: the layout-independent distributed optimizer format."""


@dataclass
class TrainState:
    """Counters that travel with a checkpoint."""

    iteration: int = 0
    """Optimizer steps done (skipped non-finite steps included)."""
    consumed_samples: int = 0
    """Rows consumed by all ranks together: the data position."""
    skipped_iterations: int = 0
    """Steps skipped for a non-finite loss or gradient norm."""
    layout: Dict[str, int] = field(default_factory=dict)
    """TP/PP/DP/VP sizes of the run that saved (RNG states need the same layout)."""
    config: Dict = field(default_factory=dict)
    """The run's configuration (informative)."""


def current_layout() -> Dict[str, int]:
    """This run's parallel layout."""
    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(),
            "vp": ps.get_virtual_pipeline_model_parallel_world_size() or 1}


def get_rng_state() -> Dict:
    """Every generator the run draws from on this rank."""
    state = {"random": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict) -> None:
    """Restore :func:`get_rng_state` output."""
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def rng_sharded_object(state: Optional[Dict] = None) -> ShardedObject:
    """This rank's RNG state as Megatron-LM stores it: sharded over (PP, TP), DP replicas."""
    return ShardedObject(
        "rng_state", state if state is not None else get_rng_state(),
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank())


def real_optimizers(optimizer) -> list:
    """The Megatron optimizers of this rank that hold parameters (no stubs: a rank whose
    parameters are all frozen has none)."""
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in opts if not getattr(o, "is_stub_optimizer", False)]


def allocate_optimizer_state(optimizer) -> None:
    """Torch optimizers create their state on the first step, but Megatron's
    DistributedOptimizer needs it allocated to build a sharded state dict for loading.
    Allocate it with Megatron's zero-gradient step, at lr = weight decay = 0 so no
    weight moves (the loaded state then replaces every value)."""
    for opt in real_optimizers(optimizer):
        inner = opt.optimizer
        if len(inner.state):
            continue
        saved = [(g["lr"], g["weight_decay"]) for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        mcore_compat.init_optimizer_states(opt)
        for g, (lr, wd) in zip(inner.param_groups, saved):
            g["lr"], g["weight_decay"] = lr, wd


def training_extra(optimizer, scheduler, state: TrainState, with_optimizer: bool = True):
    """The ``extra`` callable for :func:`checkpointing.save_checkpoint`. The optimizer is
    saved once it has made a step (the scheduler counts successful steps, the same on
    every rank); a rank whose parameters are all frozen has no optimizer shard."""
    with_optimizer = with_optimizer and scheduler.num_steps > 0

    def build(model_state: Dict) -> Dict:
        out = {"rng_state": rng_sharded_object(), "train_state": state.__dict__.copy()}
        if with_optimizer:
            if real_optimizers(optimizer):
                out["optimizer"] = optimizer.sharded_state_dict(model_state,
                                                                metadata=OPTIM_METADATA)
            out["opt_param_scheduler"] = scheduler.state_dict()
        return out

    return build


def loading_extra(optimizer, with_optimizer: bool, with_rng: bool):
    """The ``extra`` callable for :func:`checkpointing.load_checkpoint` on resume."""

    def build(model_state: Dict) -> Dict:
        out = {}
        if with_optimizer and real_optimizers(optimizer):
            allocate_optimizer_state(optimizer)
            out["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True,
                                                            metadata=OPTIM_METADATA)
        if with_rng:
            out["rng_state"] = rng_sharded_object()
        return out

    return build
