"""Batching rows into the batch contract, the resumable sampler and the DataLoader.

Resume semantics: the training stream is the fixed sequence of rows 0, 1, 2, ...
A global step takes the next ``micro_batch_size * data_parallel_size`` rows, rank ``r``
gets the ``r``-th slice of ``micro_batch_size``. Resuming from ``consumed_samples = c``
(rows already consumed over all ranks) continues at row ``c`` for any data-parallel size:
no row is repeated or skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

import torch

from eve_megatron.data.dataset import EVEPackedDataset
from eve_megatron.data.pixels import normalize_blocks


def _pixel_values(blocks: List[torch.Tensor]) -> torch.Tensor:
    """Normalise all rows' uint8 ``[n, 3, a, b]`` blocks into one float32 ``[P, 3*a*b]``
    tensor. Inside a DataLoader worker the tensor is allocated in shared memory, as torch's
    default collate does, so handing it to the main process copies nothing."""
    n = sum(b.shape[0] for b in blocks)
    dim = math.prod(blocks[0].shape[1:])
    if torch.utils.data.get_worker_info() is not None and n:
        storage = torch.UntypedStorage._new_shared(n * dim * 4)
        out = torch.tensor([], dtype=torch.float32).set_(storage).view(n, dim)
    else:
        out = torch.empty(n, dim, dtype=torch.float32)
    at = 0
    for b in blocks:
        normalize_blocks(b, out[at:at + b.shape[0]])
        at += b.shape[0]
    return out


def collate_rows(rows: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, object]:
    """Stack rows into the batch contract of docs/design.md (EVEv1 rows add
    ``teacher_pixel_values`` float32 ``[n_img, 3, 336, 336]`` and ``teacher_valid`` bool
    ``[n_img, 576]``; EVEv2 batches have neither key)."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    batch: Dict[str, object] = {k: torch.stack([r[k] for r in rows])
                                for k in ("tokens", "labels", "loss_mask", "position_ids", "is_vision")}
    seg = torch.cat([r["seg_lens"] for r in rows]).to(torch.int64)
    cu = torch.zeros(len(seg) + 1, dtype=torch.int64)
    torch.cumsum(seg, 0, out=cu[1:])
    batch["cu_seqlens"] = cu.to(torch.int32)
    batch["max_seqlen"] = int(seg.max())
    batch["pixel_values"] = _pixel_values([r["pixel_blocks"] for r in rows])
    batch["image_grid_hw"] = torch.cat([r["image_grid_hw"] for r in rows])
    batch["corrupt_samples"] = sum(int(r.get("corrupt_samples", 0)) for r in rows)
    if "teacher_u8" in rows[0]:  # EVEv1: the CLIP teacher's images, in image_grid_hw's order
        teacher = _pixel_values([r["teacher_u8"] for r in rows])
        batch["teacher_pixel_values"] = teacher.view(-1, *rows[0]["teacher_u8"].shape[1:])
        batch["teacher_valid"] = torch.cat([r["teacher_valid"] for r in rows])
    return batch


@dataclass
class ResumableBatchSampler:
    """Yields this rank's micro-batches of row indices, starting at ``consumed_samples``."""

    total_samples: int
    """Rows in the stream (the dataset length)."""
    consumed_samples: int
    """Rows already consumed by all ranks together before this run."""
    micro_batch_size: int
    data_parallel_rank: int
    data_parallel_size: int

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.data_parallel_size < 1:
            raise ValueError("micro_batch_size and data_parallel_size must be >= 1")
        if not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ValueError(f"data_parallel_rank {self.data_parallel_rank} not in "
                             f"[0, {self.data_parallel_size})")
        if not 0 <= self.consumed_samples <= self.total_samples:
            raise ValueError(f"consumed_samples {self.consumed_samples} not in "
                             f"[0, total_samples={self.total_samples}]")

    @property
    def _step(self) -> int:
        return self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self._step

    def __iter__(self) -> Iterator[List[int]]:
        first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for step in range(len(self)):
            start = first + step * self._step
            yield list(range(start, start + self.micro_batch_size))


def build_data_loader(dataset: EVEPackedDataset, consumed_samples: int, micro_batch_size: int,
                      data_parallel_rank: int = 0, data_parallel_size: int = 1,
                      num_workers: int = 2, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader over ``dataset`` for one data-parallel rank; workers decode the images."""
    sampler = ResumableBatchSampler(len(dataset), consumed_samples, micro_batch_size,
                                    data_parallel_rank, data_parallel_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_rows,
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       persistent_workers=False)
