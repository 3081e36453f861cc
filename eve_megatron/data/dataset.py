"""The torch ``Dataset`` over packs: one item is one row of the batch contract.

Row ``g`` of the training stream comes from dataset ``d = blend[g]`` (Megatron's
weighted blending), at position ``k`` of that dataset's pack stream; a pack stream
concatenates the epochs of the dataset, each packed with ``(seed, epoch)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np
import torch

from eve_megatron.data.indexed import CorruptSampleError, IndexedDataset, StoredSample
from eve_megatron.data.packing import PackIndex, build_blend_index, build_pack_index, parse_data_path
from eve_megatron.data.pixels import BLOCK, decode_blocks_u8, decode_teacher_u8
from eve_megatron.hf.evev1_image_rules import BASE_SIZE, TEACHER_GRID


@dataclass
class PackedDataConfig:
    """Which data, how it is packed, how many rows are needed."""

    data_path: List[str]
    """Megatron ``--data-path``: ``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]``."""
    seq_length: int
    """Tokens per row."""
    num_samples: int
    """Rows (packs) the run consumes in total, e.g. train_iters * global_batch_size."""
    seed: int = 1234
    """Packing/shuffling seed (the epoch is mixed in)."""
    shuffle_window: int = 10000
    """Samples per best-fit-decreasing window."""
    corrupt_samples: str = "stop"
    """A sample that fails its checksum: ``stop`` (raise :class:`CorruptSampleError` naming
    file and index) or ``skip`` (leave it out of its row and count it in the row's
    ``corrupt_samples``)."""
    blend: List = field(init=False, default_factory=list)
    """Derived: ``[(weight, prefix), ...]`` parsed from ``data_path``, weights summing to 1."""

    def __post_init__(self) -> None:
        self.blend = parse_data_path(self.data_path)
        if self.corrupt_samples not in ("stop", "skip"):
            raise ValueError(f"corrupt_samples must be 'stop' or 'skip', got {self.corrupt_samples!r}")
        if self.seq_length < 2 or self.num_samples < 0 or self.seed < 0 or self.shuffle_window < 1:
            raise ValueError(f"bad PackedDataConfig: seq_length={self.seq_length}, "
                             f"num_samples={self.num_samples}, seed={self.seed}, "
                             f"shuffle_window={self.shuffle_window}")


class PackStream:
    """Packs of one dataset over consecutive epochs, computed on demand."""

    def __init__(self, dataset: IndexedDataset, config: PackedDataConfig) -> None:
        lengths = dataset.seq_lengths
        if len(lengths) == 0:
            raise ValueError(f"dataset {dataset.prefix} is empty")
        longest = int(lengths.max())
        if longest > config.seq_length:
            raise ValueError(f"dataset {dataset.prefix} has a sample of {longest} tokens > "
                             f"seq_length {config.seq_length}; preprocess with --seq-length "
                             f"{config.seq_length}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.config = config
        self.epochs: List[PackIndex] = []
        self.starts = [0]  # first stream index of each epoch, then the end

    def ensure(self, count: int) -> None:
        """Pack enough epochs to cover stream indices ``[0, count)``."""
        while self.starts[-1] < count:
            index = build_pack_index(self.lengths, self.config.seq_length, self.config.seed,
                                     len(self.epochs), self.config.shuffle_window)
            self.epochs.append(index)
            self.starts.append(self.starts[-1] + len(index))

    def pack(self, k: int) -> np.ndarray:
        """Sample ids of stream pack ``k``."""
        self.ensure(k + 1)
        e = int(np.searchsorted(self.starts, k, side="right")) - 1
        return self.epochs[e].pack(k - self.starts[e])


def sample_arrays(s: StoredSample) -> Dict[str, np.ndarray]:
    """Spliced sequence of one sample: tokens (0 at image positions), supervised flags,
    vision flags, in stream order."""
    n = len(s.tokens) + sum(im.num_tokens for im in s.images)
    tokens = np.zeros(n, dtype=np.int64)
    sup = np.zeros(n, dtype=bool)
    vis = np.zeros(n, dtype=bool)
    src, dst = 0, 0
    for im in s.images + [None]:
        end = len(s.tokens) if im is None else im.pos
        tokens[dst:dst + end - src] = s.tokens[src:end]
        sup[dst:dst + end - src] = s.loss_mask[src:end] != 0
        dst += end - src
        src = end
        if im is not None:
            vis[dst:dst + im.num_tokens] = True
            dst += im.num_tokens
    return {"tokens": tokens, "sup": sup, "vis": vis}


def _teacher_fields(images) -> Dict[str, torch.Tensor]:
    """EVEv1: each image's teacher canvas (uint8 ``[n, 3, 336, 336]``) and valid patches."""
    pairs = [decode_teacher_u8(im.teacher, im.teacher_w, im.teacher_h) for im in images]
    if not pairs:
        return {"teacher_u8": torch.zeros(0, 3, BASE_SIZE, BASE_SIZE, dtype=torch.uint8),
                "teacher_valid": torch.zeros(0, TEACHER_GRID ** 2, dtype=torch.bool)}
    return {"teacher_u8": torch.stack([c for c, _ in pairs]),
            "teacher_valid": torch.stack([v for _, v in pairs])}


def build_row(samples: Sequence[StoredSample], seq_length: int, block: int = BLOCK,
              teacher: bool = False) -> Dict[str, torch.Tensor]:
    """One packed row: contract fields for ``[s]``, ``seg_lens`` (int32) of the row, and
    ``pixel_blocks`` (uint8 ``[P, 3, block, block]``, normalised by the collate function);
    with ``teacher`` (EVEv1) also ``teacher_u8`` and ``teacher_valid`` of each image."""
    parts = [sample_arrays(s) for s in samples]
    used = sum(len(p["tokens"]) for p in parts)
    if used > seq_length:
        raise ValueError(f"pack of {used} tokens exceeds seq_length {seq_length}")
    tokens = np.zeros(seq_length, dtype=np.int64)
    labels = np.full(seq_length, -100, dtype=np.int64)
    vis = np.zeros(seq_length, dtype=bool)
    pos = np.zeros(seq_length, dtype=np.int64)
    seg_lens, at = [], 0
    for p in parts:
        n = len(p["tokens"])
        tokens[at:at + n] = p["tokens"]
        nxt = np.where(p["sup"][1:], p["tokens"][1:], -100)
        labels[at:at + n - 1] = nxt
        vis[at:at + n] = p["vis"]
        pos[at:at + n] = np.arange(n)
        seg_lens.append(n)
        at += n
    if at < seq_length:
        pos[at:] = np.arange(seq_length - at)
        seg_lens.append(seq_length - at)
    images = [im for s in samples for im in s.images]
    pixels = [decode_blocks_u8(im.data, im.hp, im.wp, block) for im in images]
    labels_t = torch.from_numpy(labels)
    row = {
        "tokens": torch.from_numpy(tokens), "labels": labels_t,
        "loss_mask": (labels_t != -100).float(), "position_ids": torch.from_numpy(pos),
        "is_vision": torch.from_numpy(vis),
        "pixel_blocks": (torch.cat(pixels) if pixels
                         else torch.zeros(0, 3, block, block, dtype=torch.uint8)),
        "image_grid_hw": torch.tensor([[im.hp, im.wp] for im in images],
                                      dtype=torch.int64).view(-1, 2),
        "seg_lens": torch.tensor(seg_lens, dtype=torch.int32),
    }
    if teacher:
        row.update(_teacher_fields(images))
    return row


def blend_images(datasets: Sequence[IndexedDataset]):
    """``(block, teacher)`` of a blend: the one block side of the datasets that hold images
    (from their metadata), and whether their images carry EVEv1 teacher images (all or none)."""
    with_images = [ds for ds in datasets if len(ds.field("image_h"))] or list(datasets[:1])
    blocks = {ds.block for ds in with_images}
    if len(blocks) > 1:
        raise ValueError("datasets of one run must share one image block side: " + ", ".join(
            f"{ds.prefix} {ds.block}px" for ds in with_images))
    teacher = {ds.has_teacher for ds in with_images}
    if len(teacher) > 1:
        raise ValueError("EVEv1 data needs every image's teacher image, but " + ", ".join(
            ds.prefix for ds in with_images if not ds.has_teacher) + " has none (preprocess "
            "it with --model-family evev1)")
    return blocks.pop(), teacher.pop() or any(ds.has_teacher for ds in datasets)


class EVEPackedDataset(torch.utils.data.Dataset):
    """Rows ``0 .. num_samples-1`` of the blended, packed training stream."""

    def __init__(self, config: PackedDataConfig) -> None:
        self.config = config
        self.datasets = [IndexedDataset(prefix) for _, prefix in config.blend]
        self.block, self.teacher = blend_images(self.datasets)
        """Pixels per block side (the datasets' metadata; the trainer checks it against the
        model's), and whether rows carry EVEv1 teacher images."""
        self.streams = [PackStream(ds, config) for ds in self.datasets]
        self.dataset_index = self.dataset_pack_index = None  # no blending: row g = pack g
        if len(self.streams) == 1:
            self.streams[0].ensure(max(1, config.num_samples))
            return
        self.dataset_index, self.dataset_pack_index = build_blend_index(
            [w for w, _ in config.blend], config.num_samples)
        for d, stream in enumerate(self.streams):  # pack every epoch now, before workers fork
            used = self.dataset_pack_index[self.dataset_index == d]
            stream.ensure(int(used.max()) + 1 if len(used) else 1)

    def __len__(self) -> int:
        return self.config.num_samples

    def pack_samples(self, g: int):
        """``(dataset number, sample ids)`` of row ``g``."""
        if not 0 <= g < len(self):
            raise IndexError(f"row {g} out of range (num_samples={len(self)})")
        if self.dataset_index is None:
            return 0, self.streams[0].pack(g)
        d = int(self.dataset_index[g])
        return d, self.streams[d].pack(int(self.dataset_pack_index[g]))

    def __getitem__(self, g: int) -> Dict[str, torch.Tensor]:
        d, ids = self.pack_samples(g)
        ds = self.datasets[d]
        samples, corrupt = [], 0
        for i in ids:
            try:
                samples.append(ds.get(int(i)))
            except CorruptSampleError:
                if self.config.corrupt_samples == "stop":
                    raise
                corrupt += 1
        row = build_row(samples, self.config.seq_length, self.block, self.teacher)
        row["corrupt_samples"] = torch.tensor(corrupt, dtype=torch.int64)
        return row
