"""Megatron distributed checkpoint (any TP/PP/VPP, any stage) -> Hugging Face EVE folder.

Streams: the whole output is planned from the checkpoint's metadata and the recorded
architecture, then every weight is read (one layer of one stacked tensor at a time),
split by the mapping table and written into its safetensors shard before the next is
read. Peak memory is about two of the largest tensors, independent of the model size.
The folder is written under ``SAVE.tmp`` and renamed to ``SAVE`` only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import List, Optional, Tuple

import torch
from tqdm import tqdm

from eve_megatron.hf import config_map
from eve_megatron.hf.dist_reader import DistCheckpointReader, storage_key
from eve_megatron.hf.hf_files import (PlannedTensor, ShardedSafetensorsWriter, atomic_folder,
                                      plan_shards, refuse_existing)
from eve_megatron.hf.mapping import hf_shapes, megatron_to_hf
from eve_megatron.hf.shapes import expected_shapes, heads_of
from eve_megatron.training import checkpointing

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
CODE_FILES = ("configuration_eve_qwen2.py", "modeling_eve_qwen2.py")
TOKENIZER_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens",
                      "chat_template")


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
    expected = expected_shapes(fields)
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


def plan(reader: DistCheckpointReader, fields: dict, dtype: Optional[torch.dtype]
         ) -> Tuple[List[str], List[PlannedTensor]]:
    """Megatron names in write order and the HF tensors they become."""
    expected = check_tensors(reader, fields)
    heads = heads_of(fields)
    planned = []
    for name, shape in expected.items():
        out_dtype = dtype or reader.dtype(storage_key(name)[0])
        for hf_name, hf_shape in hf_shapes(name, shape, heads).items():
            planned.append(PlannedTensor(hf_name, hf_shape, out_dtype))
    return list(expected), planned


def export_checkpoint(load: str, save: str, tokenizer: Optional[str] = None,
                      iteration: Optional[int] = None, dtype: Optional[str] = None,
                      max_shard_bytes: int = 5 * 2**30, max_image_size: int = 1600,
                      overwrite: bool = False, progress: bool = True) -> dict:
    """Export ``load`` (a checkpoint root) to the HF folder ``save``; returns a summary."""
    start = time.time()
    refuse_existing(save, overwrite)
    if tokenizer and not os.path.exists(tokenizer):
        raise FileNotFoundError(f"tokenizer {tokenizer!r} does not exist")
    source, fields = resolve_checkpoint(load, iteration)
    reader = DistCheckpointReader(source)
    names, planned = plan(reader, fields, DTYPES[dtype] if dtype else None)
    shards = plan_shards(planned, max_shard_bytes)
    with atomic_folder(save) as tmp:
        _write_weights(reader, fields, names, ShardedSafetensorsWriter(tmp, shards), progress)
        out_dtype = planned[0].dtype
        _write_side_files(tmp, fields, DTYPE_NAMES[out_dtype], tokenizer, max_image_size)
    return {"output": save, "source": source, "tensors": len(planned),
            "bytes": sum(t.nbytes for t in planned), "shards": len(shards),
            "largest_tensor_bytes": max(t.nbytes for t in planned),
            "seconds": round(time.time() - start, 3)}


def _write_weights(reader, fields, names, writer: ShardedSafetensorsWriter, progress: bool) -> None:
    heads = heads_of(fields)
    with tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="export",
              disable=not progress) as bar:
        for name in names:
            key, layer = storage_key(name)
            tensor = reader.read(key, layer)
            for hf_name, part in megatron_to_hf(name, tensor, heads):
                bar.update(writer.write(hf_name, part))
            del tensor
    writer.finish()


def _write_json(folder: str, name: str, value: dict) -> None:
    with open(os.path.join(folder, name), "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def _write_side_files(folder: str, fields: dict, dtype_name: str, tokenizer: Optional[str],
                      max_image_size: int) -> None:
    """config.json, preprocessor_config.json, modelling code, tokenizer (+ generation config)."""
    eos = bos = None
    if tokenizer:
        eos, bos = _copy_tokenizer(tokenizer, folder)
    _write_json(folder, "config.json", config_map.hf_config(
        fields, dtype_name, max_image_size, bos_token_id=bos, eos_token_id=eos))
    _write_json(folder, "preprocessor_config.json", config_map.preprocessor_config(
        max_image_size, fields["patch_stride"], fields["dense_stride"]))
    if eos is not None:
        _write_json(folder, "generation_config.json",
                    {"do_sample": False, "eos_token_id": eos, "pad_token_id": eos})
    here = os.path.dirname(os.path.abspath(__file__))
    for name in CODE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(folder, name))


def _copy_tokenizer(path: str, folder: str) -> Tuple[Optional[int], Optional[int]]:
    """Copy a tokenizer folder's files (or a sentencepiece ``.model``); ``(eos, bos)`` ids."""
    from eve_megatron.data.templates import IM_END
    from eve_megatron.data.tokenizer import load_tokenizer

    if os.path.isdir(path):
        copied = [n for n in sorted(os.listdir(path)) if n.startswith(TOKENIZER_PREFIXES)]
        if not copied:
            raise FileNotFoundError(f"no tokenizer files in {path!r}")
        for name in copied:
            shutil.copyfile(os.path.join(path, name), os.path.join(folder, name))
    elif os.path.isfile(path) and path.endswith(".model"):
        shutil.copyfile(path, os.path.join(folder, "tokenizer.model"))
    else:
        raise FileNotFoundError(f"tokenizer {path!r} is neither a folder nor a .model file")
    tok = load_tokenizer(path)
    return tok.token_id(IM_END), tok.token_id("<|endoftext|>")
