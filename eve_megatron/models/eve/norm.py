"""RMSNorm for the local backend (sequence-parallel aware, unlike torch's wrapped norm)."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, scale in the input dtype.

    Under sequence parallelism its weight sees only this rank's tokens, so it is marked
    ``sequence_parallel`` and Megatron's ``finalize_model_grads`` all-reduces its gradient
    over the tensor-parallel group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
