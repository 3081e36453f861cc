"""The EVEv2 "copy" step between stage 0 and stage 1, on distributed checkpoints.

A checkpoint with ``decoupling`` none (or mlp) becomes one with ``decoupling="all"`` whose
every vision weight (``vision_*``) is an exact copy of its text twin, so the new model
computes exactly what the old one did. It works on the sharded checkpoint directly:
the target model is built in the current layout (any TP/PP/VP, a world of one by
default) and Megatron's ``dist_checkpointing`` reads each vision tensor's slice from its
text twin's key. Neither the source layout nor a full copy of the model in one process
is needed.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state

from eve_megatron import mcore_compat
from eve_megatron.models.eve.config import config_from_fields
from eve_megatron.outputs import lock_on_rank0
from eve_megatron.training import checkpointing
from eve_megatron.training.checkpoint_checksums import verify_checkpoint
from eve_megatron.training.model_setup import build_model_chunks


def twin_key(key: str) -> str:
    """Checkpoint key of a vision weight's text twin (``...vision_mlp.x`` -> ``...mlp.x``)."""
    return key.replace(".vision_", ".")


def _is_vision(name: str) -> bool:
    return any(part.startswith("vision_") for part in name.split("."))


def _checkpoint_dtype(path: str) -> torch.dtype:
    meta = dist_checkpointing.load_tensors_metadata(path)
    return meta["embedding.word_embeddings.weight"].dtype if (
        "embedding.word_embeddings.weight" in meta) else next(iter(meta.values())).dtype


def copy_vision_branch(load: str, save: str, iteration: Optional[int] = None,
                       overwrite: bool = False) -> Dict:
    """Collective: write ``save`` = ``load`` with every vision copy initialised from its
    text twin. Megatron's process groups must be initialised (any layout); returns a
    summary. Raises ValueError when the source already has all vision copies, or when
    ``save`` already holds checkpoints (unless ``overwrite``); OutputBusyError when another
    live process writes ``save``."""
    lock = lock_on_rank0(save, "checkpoint root --save")
    try:
        if checkpointing.latest_iteration(save) is not None and not overwrite:
            raise ValueError(f"--save {save} already holds checkpoints (latest iteration "
                             f"{checkpointing.latest_iteration(save)}); choose another folder "
                             "or pass --overwrite")
        return _copy(load, save, iteration)
    finally:
        if lock is not None:
            lock.release()


def _copy(load: str, save: str, iteration: Optional[int]) -> Dict:
    iteration = checkpointing._resolve(load, iteration)
    path = checkpointing.iteration_dir(load, iteration)
    verify_checkpoint(path)
    mcore_compat.check_checkpoint_layout(path)
    fields = checkpointing.read_model_fields(load, iteration)
    if fields["decoupling"] == "all":
        raise ValueError(f"{path} already has decoupling='all': nothing to copy")
    dtype = _checkpoint_dtype(path)
    cfg = config_from_fields(
        dict(fields, decoupling="all"),
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=(
            parallel_state.get_virtual_pipeline_model_parallel_world_size()),
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True)
    chunks = build_model_chunks(cfg)
    keep_mlp = fields["decoupling"] == "mlp"  # the source already has vision_mlp
    text, vision = {}, {}
    copied = set()
    for top, state in checkpointing.model_sharded_state_dict(chunks).items():
        text[top], vision[top] = {}, {}
        for name, sharded in state.items():
            if _is_vision(name) and not (keep_mlp and ".vision_mlp." in f".{name}"):
                vision[top][name] = dataclasses.replace(sharded, key=twin_key(sharded.key))
                copied.add(sharded.key)
            else:
                text[top][name] = sharded
    loaded_text = dist_checkpointing.load(text, path)
    loaded_vision = dist_checkpointing.load(vision, path)
    for chunk, top in zip(chunks, text):
        chunk.load_state_dict({**loaded_text[top], **loaded_vision[top]}, strict=True)
    out = checkpointing.save_checkpoint(save, iteration, chunks,
                                        images=checkpointing.read_image_settings(load, iteration))
    return {"source": path, "saved": out, "iteration": iteration,
            "from_decoupling": fields["decoupling"], "copied_keys": sorted(copied)}
