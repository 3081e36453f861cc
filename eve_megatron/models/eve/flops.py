"""Parameter counts and model FLOPs per token (for MFU), from the config alone."""

from __future__ import annotations

from dataclasses import dataclass

from eve_megatron.models.eve.config import EVEConfig


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
    """Exact counts for ``cfg`` (matches the instantiated model at TP=PP=1)."""
    h, v, d = cfg.hidden_size, cfg.vocab_size, cfg.kv_channels
    nq, nkv = cfg.num_attention_heads, cfg.num_query_groups
    qkv_out = (nq + 2 * nkv) * d
    attn = h * qkv_out + (qkv_out if cfg.add_qkv_bias else 0) + nq * d * h
    mlp = h * cfg.ffn_hidden_size * (3 if cfg.gated_linear_unit else 2)
    norms = 2 * h
    per_layer_copy = {"none": 0, "mlp": mlp, "all": attn + mlp + norms}[cfg.decoupling]
    p, c, ds = cfg.patch_stride, cfg.vision_hidden_size, cfg.dense_stride
    patch = 3 * p * p * c + c + c * ds * ds * h + h + 2 * h
    shared = v * h * (1 if cfg.share_embeddings_and_output_weights else 2) + h + patch
    base = cfg.num_layers * (attn + mlp + norms)
    copies = cfg.num_layers * per_layer_copy
    return ParameterCounts(total=shared + base + copies, active=shared + base,
                           vision_copies=copies, patch_embedding=patch)


def model_flops_per_token(cfg: EVEConfig, seq_length: int) -> float:
    """Training FLOPs (forward + backward) per token, Megatron-style.

    ``6 * matmul parameters a token uses`` (one branch; the LM head included, embeddings
    excluded) plus causal attention ``6 * layers * heads * head_dim * seq_length``
    (QK^T and AV, forward x3 for backward, halved for causality). The patch embedding
    runs once per 32x32 block, not per token, and is left out.
    """
    h, d = cfg.hidden_size, cfg.kv_channels
    nq, nkv = cfg.num_attention_heads, cfg.num_query_groups
    per_layer = h * (nq + 2 * nkv) * d + nq * d * h
    per_layer += h * cfg.ffn_hidden_size * (3 if cfg.gated_linear_unit else 2)
    matmul = cfg.num_layers * per_layer + cfg.vocab_size * h
    attention = 6 * cfg.num_layers * nq * d * seq_length
    return 6.0 * matmul + attention
