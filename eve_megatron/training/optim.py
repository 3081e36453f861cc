"""Megatron-Core optimizer (distributed Adam/AdamW) and its LR schedule for a run."""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from eve_megatron import mcore_compat
from eve_megatron.training.config import ConfigError, TrainConfig


def ddp_config(cfg: TrainConfig) -> DistributedDataParallelConfig:
    """Megatron DDP settings: fp32 gradient reduction, the distributed optimizer's
    reduce-scatter, optional overlap with the backward pass."""
    o = cfg.optimizer
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=o.overlap_grad_reduce,
        use_distributed_optimizer=o.use_distributed_optimizer,
        check_for_nan_in_grad=False)  # non-finite steps are skipped by the loop instead


def optimizer_config(cfg: TrainConfig) -> OptimizerConfig:
    """Megatron-Core's :class:`OptimizerConfig` from the optimizer section."""
    o, m = cfg.optimizer, cfg.model
    return OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        decoupled_weight_decay=o.decoupled_weight_decay or o.optimizer == "adamw",
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=m.bf16, params_dtype=_dtype(m.bf16),
        use_distributed_optimizer=o.use_distributed_optimizer)


def _dtype(bf16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float32


def build_optimizer(cfg: TrainConfig, ddp_chunks: List):
    """Distributed optimizer over the trainable parameters of ``ddp_chunks``."""
    mcore_compat.patch_distributed_optimizer()
    return get_megatron_optimizer(optimizer_config(cfg), ddp_chunks)


def lr_schedule_iters(cfg: TrainConfig):
    """``(warmup, decay)`` iterations: decay defaults to the whole run, warmup to
    ``lr_warmup_fraction * decay`` when the fraction is given."""
    o = cfg.optimizer
    decay = o.lr_decay_iters if o.lr_decay_iters is not None else cfg.training.iterations
    decay = max(decay, 1)
    warmup = (int(round(o.lr_warmup_fraction * decay)) if o.lr_warmup_fraction is not None
              else o.lr_warmup_iters)
    if warmup >= decay and warmup > 0:
        raise ConfigError(f"optimizer: {warmup} warmup iterations must be fewer than the "
                          f"{decay} decay iterations (lower --lr-warmup-iters/-fraction)")
    return warmup, decay


def build_scheduler(cfg: TrainConfig, optimizer) -> OptimizerParamScheduler:
    """Megatron's scheduler stepped once per iteration: linear warmup from 0, then
    ``lr_decay_style`` from ``lr`` down to ``min_lr``; constant weight decay."""
    o = cfg.optimizer
    warmup, decay = lr_schedule_iters(cfg)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=decay, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


@torch.no_grad()
def step_unless_non_finite(optimizer) -> Tuple[bool, float]:
    """One optimizer step that first checks the gradients: ``(stepped, grad norm)``.

    Megatron-Core's ``optimizer.step()`` in three public pieces, each run once:
    ``prepare_grads`` (model grads -> main grads, found-inf), ``get_grad_norm`` (one
    all-reduce), then clipping by that norm and ``step_with_ready_grads``. Between the last
    two the step is refused (no update, no optimizer state change) when the norm is NaN/Inf.
    """
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(grad_norm):
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm
