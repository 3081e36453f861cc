"""Megatron distributed checkpoint (any TP/PP/VPP, any stage) -> Hugging Face EVE folder.

Streams: the whole output is planned from the checkpoint's metadata and the recorded
architecture, then every weight is read (one layer of one stacked tensor at a time),
split by the mapping table and written into its safetensors shard before the next is
read. Peak memory is about two of the largest tensors, independent of the model size.
The folder is written under ``SAVE.tmp`` and renamed to ``SAVE`` only when complete.

Integrity: the source checkpoint is verified against its ``SHA256SUMS`` before anything is
read, the export gets its own ``SHA256SUMS`` (``sha256sum -c`` format; ``generate.py``
checks it), and ``verify=True`` (``export_hf.py --verify``) reads the finished folder back
and compares every tensor bit for bit with the checkpoint.
"""

from __future__ import annotations

import os
import time
from typing import List, Optional, Tuple

import torch
from tqdm import tqdm

from eve_megatron.checksums import check_folder, folder_files, hash_files, write_sums
from eve_megatron.hf.dist_reader import DistCheckpointReader, storage_key
from eve_megatron.hf.hf_files import (DTYPE_NAMES, DTYPES, HFWeights, PlannedTensor,
                                      ShardedSafetensorsWriter, atomic_folder, plan_shards,
                                      refuse_existing)
from eve_megatron.hf.export_files import DEFAULT_IMAGES, write_side_files
from eve_megatron.hf.mapping import hf_shapes, megatron_to_hf
from eve_megatron.hf.mapping_evev1 import VOCAB_ROWS
from eve_megatron.outputs import OutputLock
from eve_megatron.hf.shapes import heads_of, table_of
from eve_megatron.models.eve.weights import weight_shapes
from eve_megatron.training import checkpointing
from eve_megatron.training.checkpoint_checksums import verify_checkpoint



def resolve_checkpoint(load: str, iteration: Optional[int] = None) -> Tuple[str, dict]:
    """``(iteration directory, recorded architecture)`` of a checkpoint root (default: latest)."""
    if iteration is None:
        iteration = checkpointing.latest_iteration(load)
        if iteration is None:
            raise FileNotFoundError(f"no checkpoint under {load!r} (missing {checkpointing.LATEST})")
    fields = checkpointing.read_model_fields(load, iteration)
    return checkpointing.iteration_dir(load, iteration), fields


def check_tensors(reader: DistCheckpointReader, fields: dict) -> dict:
    """The architecture's weights, each checked present with the right shape and nothing
    else stored (errors name the tensor)."""
    expected = weight_shapes(fields)
    layers = fields["num_layers"]
    extra = sorted(set(reader.tensors) - {storage_key(name)[0] for name in expected})
    if extra:
        raise ValueError(f"checkpoint {reader.path!r} holds {extra[0]!r} (and {len(extra) - 1} "
                         f"more) that the recorded architecture (decoupling "
                         f"{fields['decoupling']!r}) does not have")
    for name, shape in expected.items():
        key, layer = storage_key(name)
        if key not in reader.tensors:
            raise KeyError(f"checkpoint {reader.path!r} lacks tensor {name!r} (storage key {key!r})")
        stored = reader.shape(key)
        want = shape if layer is None else (layers, *shape)
        if stored != want:
            raise ValueError(f"checkpoint tensor {name!r} (storage key {key!r}) has shape {stored}, "
                             f"the recorded architecture needs {want}")
    return expected


def plan(reader: DistCheckpointReader, fields: dict, dtype: Optional[torch.dtype],
         vocab: Optional[int] = None) -> Tuple[List[str], List[PlannedTensor]]:
    """Megatron names in write order and the HF tensors they become (``vocab``: the rows
    the vocabulary tensors keep, None = all)."""
    expected = check_tensors(reader, fields)
    heads, table = heads_of(fields), table_of(fields)
    planned = []
    for name, shape in expected.items():
        out_dtype = dtype or reader.dtype(storage_key(name)[0])
        for hf_name, hf_shape in hf_shapes(name, shape, heads, table).items():
            if vocab is not None and name in VOCAB_ROWS:
                hf_shape = (vocab, *hf_shape[1:])
            planned.append(PlannedTensor(hf_name, hf_shape, out_dtype))
    return list(expected), planned


def hf_parts(name: str, tensor: torch.Tensor, fields: dict, vocab: Optional[int] = None):
    """``(HF name, tensor)`` pairs of one Megatron tensor (vocabulary rows cut to ``vocab``)."""
    if vocab is not None and name in VOCAB_ROWS:
        tensor = tensor[:vocab]
    return megatron_to_hf(name, tensor, heads_of(fields), table_of(fields))


def hf_vocab_size(fields: dict, tokenizer: Optional[str]) -> Optional[int]:
    """EVEv1: the tokenizer's vocabulary size (the export drops the checkpoint's padding
    rows); None (every row kept) for EVEv2 or without a tokenizer."""
    if fields.get("family") != "evev1" or not tokenizer:
        return None
    from eve_megatron.data.tokenizer import load_tokenizer

    size = getattr(load_tokenizer(tokenizer), "vocab_size", None)
    if size is None or size > fields["vocab_size"]:
        raise ValueError(f"tokenizer {tokenizer!r} has {size} tokens, the checkpoint's "
                         f"vocabulary {fields['vocab_size']} rows")
    return size


def export_checkpoint(load: str, save: str, tokenizer: Optional[str] = None,
                      iteration: Optional[int] = None, dtype: Optional[str] = None,
                      max_shard_bytes: int = 5 * 2**30, max_image_size: Optional[int] = None,
                      overwrite: bool = False, progress: bool = True, alpha: Optional[str] = None,
                      vision_tower: Optional[str] = None, verify: bool = False,
                      evev1_ratio: int = 2) -> dict:
    """Export ``load`` (a checkpoint root) to the HF folder ``save``; returns a summary.

    ``max_image_size``/``alpha`` default to what the checkpoint recorded (the training
    data's), else ``DEFAULT_IMAGES``; ``vision_tower`` (``mm_vision_tower``) to ``save``'s
    absolute path. ``verify`` re-reads the finished export (see the module docstring).
    An EVEv1 checkpoint (``family: evev1``) is written in the EVE-7B-v1.0 layout
    (``export_files_evev1``; ``evev1_ratio`` 2 = 672, 4 = HD 1344).
    """
    with OutputLock(save, "export folder"):
        return _export(load, save, tokenizer, iteration, dtype, max_shard_bytes, max_image_size,
                       overwrite, progress, alpha, vision_tower, verify, evev1_ratio)


def _export(load, save, tokenizer, iteration, dtype, max_shard_bytes, max_image_size, overwrite,
            progress, alpha, vision_tower, verify, evev1_ratio) -> dict:
    start = time.time()
    refuse_existing(save, overwrite)
    if tokenizer and not os.path.exists(tokenizer):
        raise FileNotFoundError(f"tokenizer {tokenizer!r} does not exist")
    source, fields = resolve_checkpoint(load, iteration)
    verified_source = verify_checkpoint(source)
    images, origin = image_settings(load, iteration, max_image_size, alpha)
    reader = DistCheckpointReader(source)
    vocab = hf_vocab_size(fields, tokenizer)
    names, planned = plan(reader, fields, DTYPES[dtype] if dtype else None, vocab)
    shards = plan_shards(planned, max_shard_bytes)
    with atomic_folder(save) as tmp:
        _write_weights(reader, fields, names, ShardedSafetensorsWriter(tmp, shards), progress,
                       vocab)
        if fields.get("family") == "evev1":
            from eve_megatron.hf.export_files_evev1 import write_side_files_evev1

            write_side_files_evev1(tmp, fields, DTYPE_NAMES[planned[0].dtype], tokenizer,
                                   vocab or fields["vocab_size"], evev1_ratio)
        else:
            write_side_files(tmp, save, fields, DTYPE_NAMES[planned[0].dtype], tokenizer, images,
                             vision_tower)
        write_sums(tmp, hash_files(tmp, folder_files(tmp)))
    summary = {"output": save, "source": source, "source_verified": verified_source,
               "tensors": len(planned), "bytes": sum(t.nbytes for t in planned),
               "shards": len(shards), "largest_tensor_bytes": max(t.nbytes for t in planned),
               "images": dict(images, source=origin)}
    if verify:
        verify_export(save, reader, fields, names, {t.name: t.dtype for t in planned}, vocab)
        summary["verified"] = True
    return dict(summary, seconds=round(time.time() - start, 3))


def image_settings(load: str, iteration: Optional[int], max_image_size: Optional[int],
                   alpha: Optional[str]) -> Tuple[dict, str]:
    """``({"max_image_size", "alpha"}, where they came from)``: the flags, else the recorded
    settings, else ``DEFAULT_IMAGES``."""
    recorded = checkpointing.read_image_settings(load, iteration)
    images = dict(DEFAULT_IMAGES, **recorded)
    if max_image_size is not None:
        images["max_image_size"] = int(max_image_size)
    if alpha is not None:
        images["alpha"] = alpha
    origin = ("flags" if max_image_size is not None or alpha is not None
              else "checkpoint" if recorded else "default")
    return images, origin


def _write_weights(reader, fields, names, writer: ShardedSafetensorsWriter, progress: bool,
                   vocab: Optional[int] = None) -> None:
    with tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="export",
              disable=not progress) as bar:
        for name in names:
            key, layer = storage_key(name)
            tensor = reader.read(key, layer)
            for hf_name, part in hf_parts(name, tensor, fields, vocab):
                bar.update(writer.write(hf_name, part))
            del tensor
    writer.finish()


def verify_export(save: str, reader: DistCheckpointReader, fields: dict, names: List[str],
                  dtypes: dict, vocab: Optional[int] = None) -> None:
    """Check ``save`` against its ``SHA256SUMS`` and every exported tensor against the
    checkpoint (bit for bit after the export's dtype cast); raises ``ValueError`` naming
    the first tensor that differs or is missing."""
    check_folder(save, "export", required=True)
    exported = HFWeights(save)
    for name in names:
        key, layer = storage_key(name)
        for hf_name, part in hf_parts(name, reader.read(key, layer), fields, vocab):
            if hf_name not in exported:
                raise ValueError(f"export {save}: tensor {hf_name!r} is missing")
            if not torch.equal(exported.read(hf_name), part.to(dtypes[hf_name])):
                raise ValueError(f"export {save}: tensor {hf_name!r} in "
                                 f"{os.path.basename(exported.files[hf_name])} differs from the "
                                 f"checkpoint's {name!r}")
