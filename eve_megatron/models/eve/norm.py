"""RMSNorm for the local backend (sequence-parallel aware, unlike torch's wrapped norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """Qwen2 RMSNorm through torch's fused ``rms_norm`` (fp32 math, output in the input dtype).

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
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
