"""The forward step Megatron-Core's pipeline schedules call, and the per-token loss."""

from __future__ import annotations

from functools import partial
from typing import Dict, Optional

import torch
from torch import Tensor

MODEL_INPUTS = ("tokens", "position_ids", "is_vision", "cu_seqlens", "max_seqlen",
                "pixel_values", "image_grid_hw", "labels", "teacher_pixel_values", "teacher_valid")
"""Batch fields the model reads (the teacher's only in EVEv1 batches)."""


def batch_to_device(batch: Dict, device) -> Dict:
    """Move every tensor of a batch-contract dict to ``device`` (non-blocking)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
            for k, v in batch.items()}


def loss_func(loss_mask: Tensor, output, pal_weight: Optional[float] = None):
    """Sum of the supervised token losses and their count (+ EVEv1's PAL term).

    With ``config.calculate_per_token_loss`` Megatron-Core divides the gradients by the
    number of supervised tokens of the whole global batch (all micro-batches and
    data-parallel ranks), so the loss does not depend on how the batch is split.
    The reported value ``[sum, count]`` is reduced the same way by the caller.

    EVEv1 (``output = (per-token loss, PAL sum, images)``): the PAL sum is added with weight
    ``pal_weight`` = global supervised tokens / global images of the step, so that after
    Megatron's division by the tokens the step minimises ``CE per token + 1.0 * PAL per
    image`` at any micro-batch split and data-parallel size; reported as ``pal loss``
    ``[sum, images]``.
    """
    per_token_loss, pal = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}
    if pal is not None:
        pal_sum, n_images = pal
        if pal_weight is None:
            raise ValueError("an EVEv1 batch needs its step's pal_weight (set by the trainer)")
        loss_sum = loss_sum + pal_sum.float() * pal_weight
        report["pal loss"] = torch.stack([pal_sum.detach().float().reshape(()),
                                          torch.tensor(float(n_images), device=mask.device)])
    return loss_sum, num_tokens, report


def forward_step(data_iterator, model):
    """Read one micro-batch (on every pipeline stage) and run this stage's chunk."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = batch_to_device(batch, device)
    output = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
    return output, partial(loss_func, batch["loss_mask"], pal_weight=batch.get("pal_weight"))
