"""Read single weights out of a Megatron ``torch_dist`` checkpoint, without a process group.

A Megatron-Core distributed checkpoint is a PyTorch DCP checkpoint whose tensors are
stored as the chunks each rank saved: decoder weights are stacked over layers
(``decoder.layers.mlp.linear_fc1.weight`` is ``[num_layers, 2*ffn, hidden]``) and split
over tensor-parallel ranks, always in the global (TP=1) layout. :class:`DistCheckpointReader`
reads one box of one tensor (a whole tensor, or one layer of a stacked one) by
intersecting it with the stored chunks and letting DCP's file reader copy each overlap
into place, so memory stays at the requested tensor plus one stored chunk.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "pal.", "teacher.")
"""Checkpoint keys of the model; everything else (optimizer, RNG, ...) is not read."""
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def storage_key(megatron_name: str) -> Tuple[str, Optional[int]]:
    """``decoder.layers.3.mlp.x`` -> ``("decoder.layers.mlp.x", 3)``; others unchanged."""
    m = _LAYER.match(megatron_name)
    if m:
        return f"decoder.layers.{m.group(2)}", int(m.group(1))
    return megatron_name, None


class _Into:
    """The minimal DCP load planner: every read lands in a view of one output tensor."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:  # noqa: D102
        view = self.out
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:  # noqa: D102
        pass

    def load_bytes(self, item: ReadItem, value) -> None:  # noqa: D102
        raise RuntimeError(f"unexpected bytes entry {item.storage_index.fqn!r}")


class DistCheckpointReader:
    """The model tensors of one checkpoint directory (``.../iter_0000100``)."""

    def __init__(self, path: str):
        self.path = path
        meta_json = os.path.join(path, "metadata.json")
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise FileNotFoundError(f"{path!r} is not a torch_dist checkpoint (no .metadata)")
        if os.path.isfile(meta_json):
            with open(meta_json) as f:
                backend = json.load(f).get("sharded_backend", "torch_dist")
            if backend != "torch_dist":
                raise ValueError(f"{path!r}: sharded backend {backend!r}; only torch_dist is supported")
        self._reader = FileSystemReader(path)
        self._meta = self._reader.read_metadata()
        self._reader.set_up_storage_reader(self._meta, True)
        self.tensors: Dict[str, TensorStorageMetadata] = {
            key: md for key, md in self._meta.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata) and key.startswith(MODEL_PREFIXES)
            and not key.endswith("_extra_state")}

    def shape(self, key: str) -> Tuple[int, ...]:
        """Global (stacked, TP=1) shape of a stored tensor."""
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of a tensor."""
        return self.tensors[key].properties.dtype

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The whole tensor ``key``, or its slice ``[layer]`` when it is stacked over layers."""
        md = self.tensors[key]
        size = tuple(md.size)
        box_off = (0,) * len(size) if layer is None else (layer,) + (0,) * (len(size) - 1)
        box_len = size if layer is None else (1,) + size[1:]
        out = torch.empty(box_len, dtype=md.properties.dtype)
        items, covered = [], 0
        for chunk in md.chunks:
            lo = [max(b, c) for b, c in zip(box_off, chunk.offsets)]
            hi = [min(b + n, c + m) for b, n, c, m in zip(box_off, box_len, chunk.offsets, chunk.sizes)]
            if any(h <= lo_ for lo_, h in zip(lo, hi)):
                continue
            lengths = [h - lo_ for lo_, h in zip(lo, hi)]
            covered += int(torch.Size(lengths).numel())
            items.append(ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=MetadataIndex(key, torch.Size(box_off)),
                dest_offsets=torch.Size([a - b for a, b in zip(lo, box_off)]),
                storage_index=MetadataIndex(key, torch.Size(chunk.offsets)),
                storage_offsets=torch.Size([a - c for a, c in zip(lo, chunk.offsets)]),
                lengths=torch.Size(lengths)))
        if covered != out.numel():
            where = "" if layer is None else f" layer {layer}"
            raise ValueError(f"checkpoint tensor {key!r}{where}: stored chunks cover {covered} "
                             f"of {out.numel()} elements (incomplete checkpoint?)")
        self._reader.read_data(LoadPlan(items), _Into(out)).wait()
        return out if layer is None else out[0]
