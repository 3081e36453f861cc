"""Move weights between one full (TP=1, all layers) state dict and a rank's model chunk.

Names in a full state dict are the chunk's names with global layer numbers. Tensor-parallel
slicing follows the ``tensor_model_parallel``/``partition_dim``/``partition_stride``
attributes Megatron-Core sets on each parameter, so it works for any module that sets them
(including the strided ``[gate; up]`` fc1 of gated MLPs).
"""

from __future__ import annotations

import re
from typing import Dict

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")


def global_name(local_name: str, layer_offset: int) -> str:
    """``decoder.layers.{i}.x`` of a chunk -> ``decoder.layers.{i + offset}.x``."""
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    return f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}"


def chunk_layer_offset(model) -> int:
    """Global index of this chunk's first decoder layer."""
    return get_transformer_layer_offset(model.config, getattr(model, "vp_stage", None))


def _tp_split(full: torch.Tensor, param) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    world = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    per_stride = full.shape[dim] // (world * stride)
    pieces = torch.split(full, per_stride, dim=dim)
    return torch.cat(pieces[rank::world], dim=dim)


def _tp_gather(local: torch.Tensor, param) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return local
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world == 1:
        return local
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    parts = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(parts, local.contiguous(),
                                 group=parallel_state.get_tensor_model_parallel_group())
    per_rank = [torch.chunk(p, stride, dim=dim) for p in parts]
    return torch.cat([per_rank[r][i] for i in range(stride) for r in range(world)], dim=dim)


def _source_name(model, name: str, offset: int, full: Dict[str, torch.Tensor]) -> str:
    gname = global_name(name, offset)
    if (gname == "output_layer.weight" and gname not in full
            and getattr(model, "share_embeddings_and_output_weights", False)):
        return "embedding.word_embeddings.weight"
    return gname


@torch.no_grad()
def load_full_state_dict(model, full: Dict[str, torch.Tensor]) -> None:
    """Copy this chunk's slice of every weight from ``full``; raise on a missing name or shape."""
    offset = chunk_layer_offset(model)
    for name, param in model.named_parameters():
        src = _source_name(model, name, offset, full)
        if src not in full:
            raise KeyError(f"weight {src!r} (for {name!r}) is missing from the full state dict")
        piece = _tp_split(full[src], param)
        if piece.shape != param.shape:
            raise ValueError(f"weight {src!r}: full {tuple(full[src].shape)} gives "
                             f"{tuple(piece.shape)} on this rank, parameter is {tuple(param.shape)}")
        param.copy_(piece)


def gather_full(model, grads: bool = False) -> Dict[str, torch.Tensor]:
    """This chunk's weights (or gradients) as full tensors under global names.

    Collective over the tensor-parallel group; gradients are read from ``main_grad``
    when the model is DDP-wrapped, else from ``.grad``.
    """
    offset = chunk_layer_offset(model)
    out = {}
    for name, param in model.named_parameters():
        if grads:
            local = getattr(param, "main_grad", None)
            local = param.grad if local is None else local
            if local is None:
                local = torch.zeros_like(param)
        else:
            local = param.detach()
        # clone: a snapshot must not alias live parameters (float() of fp32 is a no-op)
        out[global_name(name, offset)] = _tp_gather(local.detach().float().clone(), param)
    return out
