"""Parameter counts and model FLOPs per token (for MFU), from the weights the architecture has
(``weights.weight_shapes``), without building a model."""

from __future__ import annotations

import math
from dataclasses import dataclass

from eve_megatron.models.eve.config import EVEConfig, model_fields
from eve_megatron.models.eve.weights import layer_weight_shapes, weight_shapes


@dataclass
class ParameterCounts:
    """Parameter counts of a full (unsharded) EVE model."""

    total: int
    """Every parameter, vision copies included."""
    active: int
    """Parameters one token passes through (one branch of each routed part)."""
    vision_copies: int
    """Parameters of the vision twins (0 with decoupling='none')."""
    patch_embedding: int


def parameter_counts(cfg: EVEConfig) -> ParameterCounts:
    """Exact counts for ``cfg`` (equal to the instantiated model's at TP=PP=1)."""
    sizes = {name: math.prod(shape) for name, shape in weight_shapes(model_fields(cfg)).items()}
    total = sum(sizes.values())
    copies = sum(n for name, n in sizes.items() if ".vision_" in f".{name}")
    patch = sum(n for name, n in sizes.items() if name.startswith("embedding.patch_embedding."))
    return ParameterCounts(total=total, active=total - copies, vision_copies=copies,
                           patch_embedding=patch)


def model_flops_per_token(cfg: EVEConfig, seq_length: int) -> float:
    """Training FLOPs (forward + backward) per token, Megatron-style.

    ``6 * matmul parameters a token uses`` (one branch of each layer's linears, the LM head
    included, embeddings excluded) plus causal attention ``6 * layers * heads * head_dim *
    seq_length`` (QK^T and AV, forward x3 for backward, halved for causality). The patch
    embedding runs once per 32x32 block, not per token, and is left out.
    """
    fields = model_fields(cfg)
    linears = sum(math.prod(s) for name, s in layer_weight_shapes(fields).items()
                  if len(s) == 2 and ".vision_" not in f".{name}")
    matmul = cfg.num_layers * linears + cfg.vocab_size * cfg.hidden_size
    attention = 6 * cfg.num_layers * cfg.num_attention_heads * cfg.kv_channels * seq_length
    return 6.0 * matmul + attention
