"""EVE model config: Megatron-Core's TransformerConfig plus the Qwen2 and EVE parts."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from eve_megatron.hf.eve_image_rules import DENSE_STRIDE, PATCH_STRIDE
from eve_megatron.models.eve.core_attention import ATTENTION_BACKENDS, resolve_attention_backend

DECOUPLINGS = ("none", "mlp", "all")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
INHERITED_ARCHITECTURE = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "kv_channels", "layernorm_epsilon", "add_qkv_bias", "normalization", "gated_linear_unit")
"""Megatron-Core ``TransformerConfig`` fields that define an EVE model's weights and math
(recorded in checkpoints with the ``_arch`` fields declared below)."""


def _arch(default):
    """A field that defines the architecture: recorded with every checkpoint (``MODEL_FIELDS``)."""
    return field(default=default, metadata={"architecture": True})


def _runtime(default):
    """A field of how the model runs (backend, kernels), not of what it is: not recorded."""
    return field(default=default, metadata={"architecture": False})


@dataclass
class EVEConfig(TransformerConfig):
    """Config of an EVE decoder (EVEv1.0 dense, EVEv1.5 MLP-only, EVEv2.0 divide-and-conquer).

    Qwen2 defaults are set here (RMSNorm, SwiGLU, q/k/v bias only, no dropout); every
    Megatron-Core TransformerConfig field can still be given.
    """

    FAMILY: ClassVar[str] = "evev2"
    """The model family checkpoints record (``FAMILIES``)."""
    MODEL: ClassVar[str] = "eve_megatron.models.eve.model:EVEModel"
    """The model class of the family (``module:name``, see :func:`model_class`)."""

    vocab_size: int = _arch(0)
    """Size of the (padded) vocabulary; must divide by the tensor-parallel size."""
    max_sequence_length: int = _arch(4096)
    """Largest position id + 1 the rotary table must cover."""
    rotary_base: float = _arch(1_000_000.0)
    """RoPE theta."""
    share_embeddings_and_output_weights: bool = _arch(False)
    """Tie the LM head to the token embedding (Qwen2.5-0.5B/1.5B tie, 7B does not)."""
    decoupling: str = _arch("all")
    """Which weights have a vision copy: 'none' (EVEv1.0), 'mlp' (EVEv1.5), 'all' (EVEv2.0:
    both norms, q/k/v, output projection and MLP)."""
    vision_hidden_size: int = _arch(1024)
    """Width C of the first patch-embedding conv (3 -> C)."""
    patch_stride: int = _arch(PATCH_STRIDE)
    """Kernel and stride of the first patch-embedding conv (the release's, 16)."""
    dense_stride: int = _arch(DENSE_STRIDE)
    """Kernel and stride of the second conv (C -> hidden; the release's, 2); one image token
    per (patch_stride * dense_stride)^2 pixels: the data's block (``eve_image_rules.BLOCK``)."""
    transformer_impl: str = _runtime("local")
    """'local' (pure PyTorch/Megatron, CPU and GPU) or 'transformer_engine' (TE linears/norms)."""
    core_attention_impl: str = _runtime("auto")
    """The attention backend (the trainer's --attention-backend): 'sdpa', 'flex',
    'torch_varlen', 'flash_attn', 'te' or 'auto' (see ``core_attention.py``)."""

    # Qwen2 defaults for inherited fields.
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-6
    gated_linear_unit: bool = True
    activation_func: callable = F.silu
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    calculate_per_token_loss: bool = True

    def __post_init__(self):
        if self.decoupling not in DECOUPLINGS:
            raise ValueError(f"decoupling must be one of {DECOUPLINGS}, got {self.decoupling!r}")
        if self.pipeline_dtype is None:
            self.pipeline_dtype = self.params_dtype  # what the stages exchange
        if not torch.cuda.is_available():
            # gloo matches the messages between two ranks in posting order, and Megatron's
            # batched p2p posts send_prev before send_next: with PP=2 and interleaving,
            # activations and gradients then swap. Unbatched p2p uses separate groups.
            self.batch_p2p_comm = False
        super().__post_init__()
        _validate(self)

    @property
    def block_size(self) -> int:
        """Pixels per side of the square that becomes one image token (32 in EVE)."""
        return self.patch_stride * self.dense_stride

    @property
    def attention_impl(self) -> str:
        """The core attention actually used ('auto' resolved on this machine; a backend that
        cannot run here is an error naming what it needs)."""
        return resolve_attention_backend(self.core_attention_impl, self.transformer_impl)


def _validate(cfg: EVEConfig) -> None:
    tp = cfg.tensor_model_parallel_size
    checks = [
        (cfg.vocab_size > 0, "vocab_size must be set (> 0)"),
        (cfg.vocab_size % tp == 0, f"vocab_size {cfg.vocab_size} must divide by TP={tp}; pad it"),
        (cfg.num_query_groups % tp == 0,
         f"num_query_groups {cfg.num_query_groups} must divide by TP={tp}"),
        (cfg.transformer_impl in TRANSFORMER_IMPLS,
         f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {cfg.transformer_impl!r}"),
        (cfg.core_attention_impl in ATTENTION_BACKENDS,
         f"core_attention_impl must be one of {ATTENTION_BACKENDS}, got {cfg.core_attention_impl!r}"),
        (cfg.normalization == "RMSNorm", "EVE (Qwen2) uses normalization='RMSNorm'"),
        (cfg.activation_func is F.silu, "EVE (Qwen2) uses activation_func=F.silu (SwiGLU)"),
        (not cfg.add_bias_linear,
         "add_bias_linear must be False: Qwen2 has no bias on o_proj/MLP (add_qkv_bias covers q/k/v)"),
        (not cfg.apply_rope_fusion, "apply_rope_fusion must be False: positions are per token"),
        (cfg.patch_stride > 0 and cfg.dense_stride > 0, "patch/dense strides must be positive"),
        (cfg.vision_hidden_size > 0, "vision_hidden_size must be positive"),
        (not cfg.fp8 or cfg.transformer_impl == "transformer_engine",
         "fp8 needs transformer_impl='transformer_engine'"),
        (cfg.core_attention_impl != "te" or cfg.transformer_impl == "transformer_engine",
         "core_attention_impl='te' needs transformer_impl='transformer_engine'"),
        (cfg.context_parallel_size == 1, "context parallelism is not supported by EVE models"),
        (cfg.max_sequence_length > 0, "max_sequence_length must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"EVEConfig: {message}")


_QWEN2_BASE = dict(rotary_base=1_000_000.0, layernorm_epsilon=1e-6, vision_hidden_size=1024)

PRESETS = {
    "tiny": dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, vocab_size=512, vision_hidden_size=32, max_sequence_length=4096,
        rotary_base=10_000.0, layernorm_epsilon=1e-6,
    ),
    "qwen2.5-0.5b": dict(
        num_layers=24, hidden_size=896, num_attention_heads=14, num_query_groups=2,
        ffn_hidden_size=4864, vocab_size=151936, share_embeddings_and_output_weights=True,
        max_sequence_length=32768, **_QWEN2_BASE,
    ),
    "qwen2.5-1.5b": dict(
        num_layers=28, hidden_size=1536, num_attention_heads=12, num_query_groups=2,
        ffn_hidden_size=8960, vocab_size=151936, share_embeddings_and_output_weights=True,
        max_sequence_length=32768, **_QWEN2_BASE,
    ),
    "qwen2.5-7b": dict(
        num_layers=28, hidden_size=3584, num_attention_heads=28, num_query_groups=4,
        ffn_hidden_size=18944, vocab_size=152064, share_embeddings_and_output_weights=False,
        max_sequence_length=32768, **_QWEN2_BASE,
    ),
}
PRESETS["eve-7b-hd-v2.0"] = dict(PRESETS["qwen2.5-7b"])


def eve_config(preset: str, **overrides) -> EVEConfig:
    """Build an :class:`EVEConfig` from a named preset (see ``PRESETS``) plus overrides.

    On a machine without CUDA, CPU initialisation and fp32 are the defaults.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu_initialization", True)
    kwargs.update(overrides)
    return EVEConfig(**kwargs)


def architecture_fields(cls) -> Tuple[str, ...]:
    """The fields that define a config class's weights and math: the inherited ones above
    plus every field it (or a parent) declares with ``_arch``."""
    return INHERITED_ARCHITECTURE + tuple(
        f.name for f in fields(cls) if f.metadata.get("architecture"))


MODEL_FIELDS = architecture_fields(EVEConfig)
"""What an EVEv2 checkpoint records (a family's config class may add fields)."""

FAMILIES = {"evev2": ("eve_megatron.models.eve.config", "EVEConfig"),
            "evev1": ("eve_megatron.models.evev1.config", "EVEv1Config")}
"""Model family (recorded as ``family``) -> its config class (module, name)."""


def family_config_class(family: str):
    """The config class of a model family (imported on demand)."""
    import importlib

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    module, name = FAMILIES[family]
    return getattr(importlib.import_module(module), name)


def model_class(cfg: EVEConfig):
    """The model class for ``cfg``'s family (``EVEModel``, ``EVEv1Model``, ...)."""
    import importlib

    module, name = type(cfg).MODEL.split(":")
    return getattr(importlib.import_module(module), name)


def model_fields(cfg: EVEConfig) -> dict:
    """The architecture of ``cfg`` as plain JSON-able values, with its ``family``."""
    out = {name: getattr(cfg, name) for name in architecture_fields(type(cfg))}
    out["family"] = type(cfg).FAMILY
    return out


def config_from_fields(fields: dict, **overrides) -> EVEConfig:
    """A config of the recorded family (EVEv2 when none is recorded) with a recorded
    architecture plus runtime overrides (parallel layout, dtype, backend). Unknown
    recorded fields are an error."""
    fields = dict(fields)
    cls = family_config_class(fields.pop("family", "evev2"))
    unknown = set(fields) - set(architecture_fields(cls))
    if unknown:
        raise ValueError(f"unknown model fields {sorted(unknown)}")
    kwargs = dict(fields)
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu_initialization", True)
    kwargs.update(overrides)
    return cls(**kwargs)
