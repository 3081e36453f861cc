"""EVEv2 training stages: which parameters learn, and the model config of a run.

| stage | trains | decoupling |
|---|---|---|
| 0 | patch embedding only | none (no vision copies yet) |
| (copy) | ``tools/checkpoint/copy_vision_branch.py``: vision copies = their text twins | none -> all |
| 1.0, 1.1 | patch embedding + every vision copy (``vision_*``) | all (or mlp) |
| 2, 3 | everything | any |

Freezing happens before DDP wraps the model: frozen parameters get ``requires_grad =
False``, hence no gradient buffer, no optimizer state, and they never change.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from eve_megatron.models.eve.config import EVEConfig, config_from_fields, eve_config
from eve_megatron.training.config import ConfigError, TrainConfig

STAGE_TRAINABLE = {"0": "patch_embedding", "1.0": "vision", "1.1": "vision", "2": "all", "3": "all"}
"""Default trainable set of each stage."""
STAGE_DECOUPLING = {"0": ("none",), "1.0": ("all", "mlp"), "1.1": ("all", "mlp")}
"""Decouplings a stage accepts (stages 2 and 3 accept any)."""


def trainable_set(cfg: TrainConfig) -> str:
    """``patch_embedding``, ``vision`` or ``all`` for this run."""
    t = cfg.training
    if t.trainable is not None:
        return t.trainable
    return STAGE_TRAINABLE[t.stage] if t.stage is not None else "all"


def is_trainable(name: str, which: str) -> bool:
    """Whether parameter ``name`` (a chunk's local name) learns under ``which``. EVEv1's
    teacher never learns; its PAL (``pal.*``) belongs to the vision set (the official
    prealign stage trains the PEL, the projector and the PAL)."""
    if name.startswith("teacher."):
        return False
    if which == "all":
        return True
    patch = name.startswith("embedding.patch_embedding.")
    if which == "patch_embedding":
        return patch
    if which == "vision":
        return (patch or name.startswith("pal.")
                or any(part.startswith("vision_") for part in name.split(".")))
    raise ValueError(f"unknown trainable set {which!r}")


def preset_config(preset: str, **overrides) -> EVEConfig:
    """The config of a named preset of any family (EVEv2 ``tiny``, ``qwen2.5-7b``, ...;
    EVEv1 ``evev1-tiny``, ``evev1-7b``)."""
    from eve_megatron.models.evev1.config import PRESETS as EVEV1_PRESETS, evev1_config

    if preset in EVEV1_PRESETS:
        return evev1_config(preset, **overrides)
    return eve_config(preset, **overrides)


def apply_freezing(chunks: List[torch.nn.Module], which: str) -> Dict[str, int]:
    """Set ``requires_grad`` on every parameter; returns element counts per kind."""
    counts = {"trainable": 0, "frozen": 0}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            on = is_trainable(name, which)
            param.requires_grad_(on)
            counts["trainable" if on else "frozen"] += param.numel()
    return counts


_ARCH_FLAGS = {"num_layers": "num_layers", "hidden_size": "hidden_size",
               "ffn_hidden_size": "ffn_hidden_size", "num_attention_heads": "num_attention_heads",
               "num_query_groups": "num_query_groups", "vision_hidden_size": "vision_hidden_size",
               "vocab_size": "vocab_size", "max_position_embeddings": "max_sequence_length"}


def runtime_overrides(cfg: TrainConfig) -> dict:
    """EVEConfig fields that do not change the weights: layout, precision, recompute."""
    m, p = cfg.model, cfg.parallel
    dtype = torch.bfloat16 if m.bf16 else torch.float32
    out = dict(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel, transformer_impl=m.transformer_impl,
        core_attention_impl=m.attention_backend,
        bf16=m.bf16, params_dtype=dtype, pipeline_dtype=dtype, init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
        recompute_granularity=m.recompute_granularity, recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers)
    if m.fp8_format is not None:
        out.update(fp8=m.fp8_format)
    if torch.cuda.is_available():
        out.update(use_cpu_initialization=False)
    return out


def build_model_config(cfg: TrainConfig, checkpoint_fields: Optional[dict],
                       checkpoint: Optional[str] = None) -> EVEConfig:
    """The run's :class:`EVEConfig`: the checkpoint's architecture when loading (explicit
    architecture flags must then agree), else the preset plus overrides; the decoupling
    must suit the stage."""
    m = cfg.model
    arch = {target: getattr(m, flag) for flag, target in _ARCH_FLAGS.items()
            if getattr(m, flag) is not None}
    if m.decoupling is not None:
        arch["decoupling"] = m.decoupling
    stage = cfg.training.stage
    if checkpoint_fields is not None:
        for key, value in arch.items():
            if checkpoint_fields.get(key) != value:
                hint = (" (run tools/checkpoint/copy_vision_branch.py to add the vision copies)"
                        if key == "decoupling" else "")
                raise ConfigError(f"model: {key}={value!r} but the checkpoint {checkpoint}"
                                  f" has {checkpoint_fields.get(key)!r}{hint}")
        model = config_from_fields(checkpoint_fields, **runtime_overrides(cfg))
    else:
        if m.preset is None:
            raise ConfigError("model: give --model-preset (or --load a checkpoint)")
        if "decoupling" not in arch and stage in STAGE_DECOUPLING:
            arch["decoupling"] = STAGE_DECOUPLING[stage][0]
        try:
            model = preset_config(m.preset, **arch, **runtime_overrides(cfg))
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None
    if stage in STAGE_DECOUPLING and model.decoupling not in STAGE_DECOUPLING[stage]:
        hint = (" (run tools/checkpoint/copy_vision_branch.py on the stage-0 checkpoint first)"
                if model.decoupling == "none" else "")
        raise ConfigError(f"training: stage {stage} needs decoupling in "
                          f"{STAGE_DECOUPLING[stage]}, the model has {model.decoupling!r}{hint}")
    if trainable_set(cfg) == "vision" and model.decoupling == "none" and model.FAMILY == "evev2":
        raise ConfigError("training: trainable=vision needs a model with vision copies")
    try:
        model.attention_impl  # resolve the attention backend on this machine, before any work
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from None
    return model
