"""Hugging Face weight files: a lazy reader (safetensors or ``.bin``, sharded or not) and a
streaming sharded safetensors writer.

The writer is given the full plan (names, shapes, dtypes) first, so every shard's header
is known before any data exists; tensors are then written one at a time, in plan order,
straight from their memory (no copy), so memory stays at the tensor being written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from eve_megatron.outputs import fsync_dir, fsync_tree

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtypes conversions write, by their command-line names (``--dtype``)."""
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
"""``config.json``'s ``torch_dtype`` of each."""
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


class HFWeights:
    """Tensors of an HF model folder, read one at a time (safetensors lazily, ``.bin`` mmapped)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.files: Dict[str, str] = {}
        for index in INDEX_NAMES:
            path = os.path.join(folder, index)
            if os.path.isfile(path):
                with open(path) as f:
                    self.files = {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
                break
        else:
            for single in SINGLE_NAMES:
                path = os.path.join(folder, single)
                if os.path.isfile(path):
                    self.files = {name: path for name in self._names_in(path)}
                    break
        if not self.files:
            raise FileNotFoundError(f"no weights in {folder!r} (looked for {INDEX_NAMES + SINGLE_NAMES})")
        self._bin_path: Optional[str] = None
        self._bin: Dict[str, torch.Tensor] = {}

    @staticmethod
    def _names_in(path: str) -> List[str]:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                return list(f.keys())
        return list(torch.load(path, map_location="cpu", mmap=True, weights_only=True))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> List[str]:
        """Every tensor name of the folder."""
        return list(self.files)

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of a tensor, without reading its data (safetensors)."""
        path = self.files[name]
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                code = f.get_slice(name).get_dtype()
            return {v: k for k, v in SAFETENSORS_DTYPES.items()}.get(code) or getattr(torch, code.lower())
        return self.read(name).dtype

    def read(self, name: str) -> torch.Tensor:
        """One tensor (KeyError naming it and the folder when absent)."""
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is missing from {self.folder!r}")
        path = self.files[name]
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                return f.get_tensor(name)
        if path != self._bin_path:
            self._bin = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            self._bin_path = path
        return self._bin[name]


@dataclass
class PlannedTensor:
    """One tensor of the output: name, shape, dtype, and (once planned) shard and offset."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    shard: int = 0
    begin: int = 0

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty(0, dtype=self.dtype).element_size()


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> List[List[PlannedTensor]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor
    gets a shard of its own); sets each tensor's shard number and data offset."""
    shards: List[List[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        t.shard, t.begin = len(shards) - 1, size
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(n: int) -> List[str]:
    """HF's shard names: ``model.safetensors`` alone, else ``model-0000k-of-0000n.safetensors``."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def _header(shard: List[PlannedTensor]) -> bytes:
    head = {"__metadata__": {"format": "pt"}}
    for t in shard:
        head[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [t.begin, t.begin + t.nbytes]}
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Write planned shards into ``folder``, one tensor at a time, in plan order."""

    def __init__(self, folder: str, shards: List[List[PlannedTensor]]):
        self.folder, self.shards = folder, shards
        self.files = shard_file_names(len(shards))
        self.planned = [t for shard in shards for t in shard]
        self.total_bytes = sum(t.nbytes for t in self.planned)
        self._next = 0
        self._fh = None
        self._open_shard = -1

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append the next planned tensor (cast to its planned dtype); returns its bytes."""
        planned = self.planned[self._next]
        if planned.name != name or tuple(tensor.shape) != planned.shape:
            raise ValueError(f"tensor {name!r} {tuple(tensor.shape)} does not match the plan's "
                             f"next tensor {planned.name!r} {planned.shape}")
        tensor = tensor.to(planned.dtype)
        if planned.shard != self._open_shard:
            self._close()
            self._fh = open(os.path.join(self.folder, self.files[planned.shard]), "wb")
            self._fh.write(_header(self.shards[planned.shard]))
            self._open_shard = planned.shard
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))
        self._next += 1
        return planned.nbytes

    def _close(self) -> None:  # flushed to stable storage with the folder (atomic_folder)
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self) -> None:
        """Close the last shard and write the index (when there are several shards)."""
        if self._next != len(self.planned):
            raise ValueError(f"only {self._next} of {len(self.planned)} planned tensors were written; "
                             f"next missing: {self.planned[self._next].name!r}")
        self._close()
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {t.name: self.files[t.shard] for t in self.planned}}
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)


def refuse_existing(save: str, overwrite: bool) -> None:
    """Fail early when the output folder exists and may not be replaced."""
    if os.path.exists(save) and not overwrite:
        raise FileExistsError(f"{save!r} exists (pass overwrite=True / --overwrite to replace it)")


@contextlib.contextmanager
def atomic_folder(save: str) -> Iterator[str]:
    """Yield an empty ``SAVE.tmp`` to write into; when the block succeeds it is flushed to
    stable storage and replaces ``save``; when anything fails it is removed: never a partial
    folder under ``save``, also after a power loss."""
    tmp = save.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        if os.path.exists(save):
            shutil.rmtree(save)
        os.replace(tmp, save)
        fsync_dir(os.path.dirname(os.path.abspath(save)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
