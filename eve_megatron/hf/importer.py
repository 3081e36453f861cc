"""Hugging Face Qwen2/Qwen2.5 or EVE folder -> Megatron distributed checkpoint (model only).

Every tensor-parallel x pipeline rank builds its model chunk and fills it through
:func:`models.eve.sharding.load_full_state_dict` from a lazy view of the HF folder: each
full weight is read and merged (mapping table) only when that rank needs it, then sliced.
The chunks are saved with ``training.checkpointing.save_checkpoint`` (model only, under
``SAVE.tmp``, renamed to ``SAVE`` when every rank is done).

- A Qwen2 source gets a fresh patch embedding (seeded, identical on every rank).
- Vision copies the source lacks (a Qwen2 source imported with ``decoupling`` mlp/all, or
  an EVE source with fewer decoupled parts) are copies of their text twins: the
  reference's "copy" step.
- EVEv1 (``import_evev1``): a released EVE-7B-v1.0 folder or a plain Llama/Vicuna one
  becomes a ``family: evev1`` checkpoint through EVEv1's name table; the teacher comes
  from the folder or from ``teacher`` (an HF CLIP folder, which wins), a Llama source gets
  a fresh PEL and PAL.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Callable, Dict, Optional

import torch

from eve_megatron.hf import config_map
from eve_megatron.hf import import_evev1
from eve_megatron.hf.hf_files import DTYPES, HFWeights, atomic_folder, refuse_existing
from eve_megatron.hf.mapping import hf_names, hf_to_megatron, vision_twin
from eve_megatron.hf.mapping_evev1 import CLIP
from eve_megatron.hf.progress import FileProgress, write_progress
from eve_megatron.outputs import OutputLock
from eve_megatron.hf.shapes import heads_of, table_of
from eve_megatron.models.eve.weights import weight_shapes

_PATCH = "embedding.patch_embedding."


def read_image_settings(hf_dir: str) -> dict:
    """``checkpointing.IMAGE_KEYS`` of an EVE folder from its ``preprocessor_config.json``
    (``{}`` for a plain Qwen2 folder). The official release drops alpha."""
    pre = os.path.join(hf_dir, "preprocessor_config.json")
    if not os.path.isfile(pre):
        return {}
    with open(pre) as f:
        p = json.load(f)
    if "max_size" not in p:
        return {}
    return {"max_image_size": int(p["max_size"]), "alpha": p.get("alpha", "drop")}


def read_source(hf_dir: str, decoupling: Optional[str] = None,
                vision_hidden_size: int = 1024, teacher: Optional[str] = None) -> dict:
    """Architecture (``MODEL_FIELDS``) of an HF folder, with its preprocessor strides if any
    (an EVEv1 or Llama folder: ``family: evev1``, the teacher's sizes from ``teacher``)."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    if import_evev1.is_evev1_source(cfg):
        if decoupling not in (None, "none"):
            raise ValueError(f"EVEv1 is dense: --decoupling {decoupling!r} does not apply")
        return import_evev1.read_evev1_fields(cfg, teacher, vision_hidden_size)
    if teacher:
        raise ValueError("--teacher is for EVEv1 / Llama sources only")
    fields = config_map.fields_from_hf(cfg, decoupling, vision_hidden_size)
    pre = os.path.join(hf_dir, "preprocessor_config.json")
    if config_map.is_eve_config(cfg) and os.path.isfile(pre):
        with open(pre) as f:
            p = json.load(f)
        fields["patch_stride"] = p.get("patch_stride", fields["patch_stride"])
        fields["dense_stride"] = p.get("dense_stride", fields["dense_stride"])
    return fields


class LazyFullStateDict(Mapping):
    """Full (TP=1) Megatron weights computed on access from an HF folder."""

    def __init__(self, weights: HFWeights, fields: dict, dtype: torch.dtype, seed: int,
                 on_read: Optional[Callable[[], None]] = None):
        self.weights, self.fields, self.dtype, self.seed = weights, fields, dtype, seed
        self.on_read = on_read
        self.shapes = weight_shapes(fields)
        self.heads, self.table = heads_of(fields), table_of(fields)
        self.evev1 = fields.get("family") == "evev1"
        self.fresh_prefixes = import_evev1.FRESH_PREFIXES if self.evev1 else (_PATCH,)
        self.has_vision_tower = any(n.startswith("model.vision_tower.") for n in weights.names())
        self.used, self.origin = set(), {}
        self._fresh: Optional[Dict[str, torch.Tensor]] = None

    def __contains__(self, name) -> bool:
        return name in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def source(self, name: str) -> str:
        """Where ``name`` comes from: ``hf``, ``text copy`` or ``fresh``; KeyError if nowhere."""
        names = hf_names(name, self.table)
        if all(h in self.weights for h in names):
            return "hf"
        twin = vision_twin(name)
        if twin and all(h in self.weights for h in hf_names(twin)):
            return "text copy"
        if name.startswith(self.fresh_prefixes) and not self.has_vision_tower:
            return "fresh"
        missing = [h for h in names if h not in self.weights]
        hint = " (the CLIP teacher: pass --teacher CLIP_DIR)" if missing[0].startswith(CLIP) else ""
        raise KeyError(f"HF tensor {missing[0]!r} (for Megatron {name!r}) is missing from "
                       f"{self.weights.folder!r}{hint}")

    def __getitem__(self, name: str) -> torch.Tensor:
        origin = self.source(name)
        if origin == "fresh":
            tensor = self._fresh_patch_embedding()[name]
        else:
            src = name if origin == "hf" else vision_twin(name)
            self.used.update(hf_names(src, self.table))
            tensor = hf_to_megatron(src, self.weights.read, self.heads, self.table)
        if tuple(tensor.shape) != self.shapes[name]:
            raise ValueError(f"{name!r} from {self.weights.folder!r} has shape "
                             f"{tuple(tensor.shape)}, the architecture needs {self.shapes[name]}")
        self.origin[name] = origin
        if self.on_read is not None:
            self.on_read()
        return tensor.to(self.dtype)

    def _fresh_patch_embedding(self) -> Dict[str, torch.Tensor]:
        """A new patch embedding drawn from ``seed`` (the same on every rank)."""
        if self._fresh is None and self.evev1:
            self._fresh = import_evev1.fresh_evev1(self.fields, self.seed)
        if self._fresh is None:
            from eve_megatron.models.eve.config import config_from_fields
            from eve_megatron.models.eve.patch_embedding import PatchEmbedding

            cfg = config_from_fields(self.fields, use_cpu_initialization=True)
            with torch.random.fork_rng():
                torch.manual_seed(self.seed)
                module = PatchEmbedding(cfg)
            self._fresh = {_PATCH + k: v.detach() for k, v in module.state_dict().items()}
        return self._fresh


def open_weights(hf_dir: str, fields: dict, teacher: Optional[str] = None):
    """The source's tensors (EVEv1: with its teacher's, from ``teacher``, an HF CLIP
    folder, when given)."""
    weights = HFWeights(hf_dir)
    if fields.get("family") == "evev1":
        return import_evev1.EVEv1Weights(weights, teacher)
    return weights


def import_rank(hf_dir: str, save: str, tp: int, pp: int, fields: dict, dtype: str = "fp32",
                seed: int = 1234, iteration: int = 0, progress_file: Optional[str] = None,
                teacher: Optional[str] = None) -> dict:
    """Rank function: build this rank's chunk, fill it from ``hf_dir``, save (collective)
    with the source's image settings (an EVE folder's ``preprocessor_config.json``).

    Rank 0 writes ``"done total"`` (tensors of its chunk) to ``progress_file`` as it goes.
    """
    from eve_megatron.models.eve.config import config_from_fields, model_class
    from eve_megatron.models.eve.sharding import load_full_state_dict
    from eve_megatron.parallel import ParallelConfig, initialize_parallel
    from eve_megatron.training.checkpointing import save_checkpoint

    initialize_parallel(ParallelConfig(tp, pp), seed=seed)
    torch_dtype = DTYPES[dtype]
    cfg = config_from_fields(fields, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             params_dtype=torch_dtype, bf16=torch_dtype == torch.bfloat16,
                             fp16=torch_dtype == torch.float16)
    model = model_class(cfg)(cfg).to(torch_dtype)
    if hasattr(model, "teacher"):
        model.teacher.float()  # EVEv1's frozen teacher always runs in fp32
    report = None
    if progress_file and torch.distributed.get_rank() == 0:
        total, done = sum(1 for _ in model.parameters()), [0]

        def report():
            done[0] += 1
            write_progress(progress_file, done[0], total)
    weights = open_weights(hf_dir, fields, teacher)
    full = LazyFullStateDict(weights, fields, torch_dtype, seed, report)
    load_full_state_dict(model, full)
    save_checkpoint(save, iteration, [model], images=read_image_settings(hf_dir))
    return {"used": sorted(full.used)}


def import_hf(hf_dir: str, save: str, tp: int = 1, pp: int = 1, decoupling: Optional[str] = None,
              dtype: Optional[str] = None, vision_hidden_size: int = 1024, seed: int = 1234,
              iteration: int = 0, overwrite: bool = False, progress: bool = True,
              timeout: float = 7 * 24 * 3600, teacher: Optional[str] = None) -> dict:
    """Import ``hf_dir`` into the checkpoint root ``save`` with ``tp * pp`` local ranks (one
    importer per ``save``: an OS lock); ``teacher``: an HF CLIP folder for an EVEv1 import."""
    with OutputLock(save, "checkpoint root --save"):
        return _import(hf_dir, save, tp, pp, decoupling, dtype, vision_hidden_size, seed,
                       iteration, overwrite, progress, timeout, teacher)


def _import(hf_dir, save, tp, pp, decoupling, dtype, vision_hidden_size, seed, iteration,
            overwrite, progress, timeout, teacher) -> dict:
    from eve_megatron.launch import run_distributed

    start = time.time()
    refuse_existing(save, overwrite)
    fields = read_source(hf_dir, decoupling, vision_hidden_size, teacher)
    if fields["vocab_size"] % tp or fields["num_query_groups"] % tp or fields["ffn_hidden_size"] % tp:
        raise ValueError(f"TP={tp} must divide vocab_size {fields['vocab_size']}, the "
                         f"{fields['num_query_groups']} key/value heads and ffn "
                         f"{fields['ffn_hidden_size']}")
    if fields["num_layers"] % pp:
        raise ValueError(f"PP={pp} must divide the {fields['num_layers']} layers")
    weights = open_weights(hf_dir, fields, teacher)
    dtype = dtype or _source_dtype(weights)
    probe = LazyFullStateDict(weights, fields, DTYPES[dtype], seed)
    origins = {name: probe.source(name) for name in probe}  # fails early, naming what is missing
    with atomic_folder(save) as tmp:
        progress_file = os.path.join(tmp, ".import_progress")
        with FileProgress(progress_file, "import (rank 0 tensors)", "tensor", progress):
            results = run_distributed(
                "eve_megatron.hf.importer:import_rank", tp * pp, timeout=timeout, hf_dir=hf_dir,
                save=tmp, tp=tp, pp=pp, fields=fields, dtype=dtype, seed=seed,
                iteration=iteration, progress_file=progress_file, teacher=teacher)
        os.remove(progress_file)
    used = set().union(*(r["used"] for r in results))
    element = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    return {"output": save, "source": hf_dir, "tp": tp, "pp": pp, "dtype": dtype,
            "family": fields.get("family", "evev2"), "decoupling": fields["decoupling"],
            "images": read_image_settings(hf_dir),
            "tensors": len(origins),
            "bytes": element * sum(_numel(s) for s in probe.shapes.values()),
            "copied_from_text": sum(o == "text copy" for o in origins.values()),
            "fresh": sum(o == "fresh" for o in origins.values()),
            "unused_hf_tensors": sorted(set(weights.names()) - used),
            "seconds": round(time.time() - start, 3)}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _source_dtype(weights: HFWeights) -> str:
    """The dtype name of the folder's embedding (what the import keeps by default)."""
    dtype = weights.dtype("model.embed_tokens.weight")
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"unsupported source dtype {dtype}")
    return names[dtype]

