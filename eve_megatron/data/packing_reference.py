"""Pure-Python reference of the C++ packer and blender (``csrc/packing.cpp``).

Slow but short enough to check by eye; tests require the C++ output to be identical.
"""

from __future__ import annotations

import bisect
from typing import List, Sequence, Tuple

_MASK = (1 << 64) - 1


class SplitMix64:
    """The SplitMix64 generator, bit-identical to the C++ one."""

    def __init__(self, state: int) -> None:
        self.state = state & _MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def bounded(self, n: int) -> int:
        """Integer in [0, n) by multiply-shift."""
        return (self.next() * n) >> 64

    def shuffle(self, items: list) -> None:
        """Fisher-Yates shuffle in place, same draw order as C++."""
        for i in range(len(items), 1, -1):
            j = self.bounded(i)
            items[i - 1], items[j] = items[j], items[i - 1]


def _pack_window(lengths: Sequence[int], window: List[int], capacity: int,
                 rng: SplitMix64) -> List[List[int]]:
    window = sorted(window, key=lambda i: -lengths[i])  # stable: ties keep shuffled order
    stacks: dict = {}  # remaining capacity -> LIFO stack of bin ids
    nonempty: List[int] = []  # sorted remaining capacities that have a bin
    bins: List[List[int]] = []
    for i in window:
        need = lengths[i]
        k = bisect.bisect_left(nonempty, need)
        if k < len(nonempty):
            rem = nonempty[k]
            b = stacks[rem].pop()
            if not stacks[rem]:
                del nonempty[k]
            bins[b].append(i)
        else:
            rem, b = capacity, len(bins)
            bins.append([i])
        new_rem = rem - need
        stack = stacks.setdefault(new_rem, [])
        if not stack:
            bisect.insort(nonempty, new_rem)
        stack.append(b)
    rng.shuffle(bins)
    return bins


def pack_reference(lengths: Sequence[int], seq_length: int, seed: int, epoch: int,
                   window: int) -> Tuple[List[int], List[int]]:
    """Return ``(pack_offsets, pack_samples)`` exactly as ``eve_megatron._C.build_pack_index``."""
    lengths = [int(x) for x in lengths]
    for i, n in enumerate(lengths):
        if n < 1 or n > seq_length:
            raise ValueError(f"sample {i} has length {n}, outside [1, seq_length={seq_length}]")
    rng = SplitMix64(seed ^ ((epoch * 0xD1B54A32D192ED03) & _MASK))
    perm = list(range(len(lengths)))
    rng.shuffle(perm)
    offsets, samples = [0], []
    for start in range(0, len(perm), window):
        for b in _pack_window(lengths, perm[start:start + window], seq_length, rng):
            samples.extend(b)
            offsets.append(len(samples))
    return offsets, samples


def blend_reference(weights: Sequence[float], size: int) -> Tuple[List[int], List[int]]:
    """Megatron's greedy blending: ``(dataset_index, dataset_sample_index)`` for ``size`` samples."""
    counts = [0] * len(weights)
    ds, idx = [], []
    for i in range(size):
        t = max(float(i), 1.0)
        errors = [w * t - float(c) for w, c in zip(weights, counts)]
        best = max(range(len(weights)), key=lambda d: (errors[d], -d))
        ds.append(best)
        idx.append(counts[best])
        counts[best] += 1
    return ds, idx
