"""The forward step Megatron-Core's pipeline schedules call, and the per-token loss."""

from __future__ import annotations

from functools import partial
from typing import Dict

import torch
from torch import Tensor

MODEL_INPUTS = ("tokens", "position_ids", "is_vision", "cu_seqlens", "max_seqlen",
                "pixel_values", "image_grid_hw", "labels")


def batch_to_device(batch: Dict, device) -> Dict:
    """Move every tensor of a batch-contract dict to ``device`` (non-blocking)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
            for k, v in batch.items()}


def loss_func(loss_mask: Tensor, per_token_loss: Tensor):
    """Sum of the supervised token losses and their count.

    With ``config.calculate_per_token_loss`` Megatron-Core divides the gradients by the
    number of supervised tokens of the whole global batch (all micro-batches and
    data-parallel ranks), so the loss does not depend on how the batch is split.
    The reported value ``[sum, count]`` is reduced the same way by the caller.
    """
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """Read one micro-batch (on every pipeline stage) and run this stage's chunk."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = batch_to_device(batch, device)
    output = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
    return output, partial(loss_func, batch["loss_mask"])
