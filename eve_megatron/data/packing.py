"""Typed wrappers of the C++ pack index and blending index builders.

Packing: the epoch's samples are shuffled (seed, epoch), cut into windows of
``window`` samples, and each window is packed best-fit-decreasing into bins of
``seq_length`` tokens; a window's packs are then shuffled. Every sample appears in
exactly one pack per epoch and no pack exceeds ``seq_length``.
``packing_reference.py`` holds the pure-Python twin that tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

try:
    from eve_megatron import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError("eve_megatron._C (the C++ extension in csrc/) is not built; run "
                      "`pip install -e .` or `python setup.py build_ext --inplace`") from exc


@dataclass(frozen=True)
class PackIndex:
    """Which samples form each pack: pack ``p`` is ``samples[offsets[p]:offsets[p+1]]``."""

    offsets: np.ndarray
    """int64 ``[n_packs + 1]``, starts at 0, ends at the number of samples."""
    samples: np.ndarray
    """int64 ``[n_samples]``, sample ids of the dataset, grouped by pack."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def pack(self, p: int) -> np.ndarray:
        """Sample ids of pack ``p`` in their order inside the pack."""
        return self.samples[self.offsets[p]:self.offsets[p + 1]]

    def pack_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """Tokens used by each pack given the per-sample ``lengths``."""
        per_sample = np.asarray(lengths, dtype=np.int64)[self.samples]
        return np.add.reduceat(per_sample, self.offsets[:-1]) if len(self) else per_sample[:0]


def build_pack_index(lengths: Sequence[int], seq_length: int, seed: int, epoch: int,
                     window: int = 10000) -> PackIndex:
    """Pack samples of the given token ``lengths`` into sequences of ``seq_length``.

    Deterministic in ``(lengths, seq_length, seed, epoch, window)``. Raises ValueError
    naming the sample when a length is outside ``[1, seq_length]``.
    """
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed} epoch={epoch}")
    offsets, samples = _C.build_pack_index(lengths, int(seq_length), int(seed), int(epoch),
                                           int(window))
    return PackIndex(offsets=offsets, samples=samples)


def build_blend_index(weights: Sequence[float], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Megatron's weighted blending of ``len(weights)`` datasets into ``size`` samples.

    Sample ``i`` is taken from the dataset whose count lags its share ``w_d * i`` most
    (first dataset on ties). Returns ``(dataset_index int32, dataset_sample_index int64)``:
    the dataset of each sample and its running index inside that dataset.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum, got {weights}")
    return _C.build_blend_index(w / w.sum(), int(size))


def parse_data_path(data_path: Sequence[str]) -> List[Tuple[float, str]]:
    """Parse Megatron's ``--data-path``: ``[p]`` or ``[w1, p1, w2, p2, ...]``.

    Returns ``[(weight, prefix), ...]`` with weights normalised to sum to 1.
    """
    items = list(data_path)
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) == 0 or len(items) % 2:
        raise ValueError(f"--data-path needs one prefix or weight/prefix pairs, got {items}")
    pairs = []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"--data-path weight {w!r} (before {p!r}) is not a number") from None
        if weight < 0:
            raise ValueError(f"--data-path weight {weight} for {p!r} is negative")
        pairs.append((weight, p))
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise ValueError(f"--data-path weights sum to {total}; need a positive sum")
    return [(w / total, p) for w, p in pairs]
