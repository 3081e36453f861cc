#!/usr/bin/env python
"""Loader throughput per worker at 1600^2 images.

Builds a dataset of caption samples with 1600x1600 photos-like JPEG images (stored as
preprocessing stores them: resized, JPEG q95 4:4:4), then times rows/s and input
samples/s through ``EVEPackedDataset`` + ``DataLoader`` (decode, blocks, normalisation,
collate, transfer): first in-process on one thread (the per-worker cost), then with
``--workers`` worker processes.

    python tools/bench/bench_loader.py --samples 64 --seq-length 8192 --workers 2
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from eve_megatron.data.dataset import EVEPackedDataset, PackedDataConfig  # noqa: E402
from eve_megatron.data.images import ImageConfig, encode_image  # noqa: E402
from eve_megatron.data.indexed import IndexedDatasetWriter, StoredImage  # noqa: E402
from eve_megatron.data.loader import build_data_loader  # noqa: E402


def photo(side, seed):
    """A photo-like image: smooth random field plus fine noise (JPEG-realistic size)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((side, side), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-4, 5, base.shape, dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def build(prefix, n, side, image_format):
    cfg = ImageConfig(max_size=side, encode_format=image_format)
    rng = np.random.default_rng(0)
    images = [encode_image(photo(side, s), cfg) for s in range(4)]  # reuse a few encodings
    w = IndexedDatasetWriter(prefix, {"bench": True})
    for i in range(n):
        t = int(rng.integers(10, 301))
        w.add(rng.integers(1, 150000, t), np.ones(t), [StoredImage(images[i % 4], side // 32,
                                                                   side // 32, 0)])
    w.finalize()
    return sum(len(b) for b in images) / len(images)


def run(ds, workers, rows):
    loader = build_data_loader(ds, 0, 1, num_workers=workers)
    it = iter(loader)
    next(it)  # warm-up: worker start, first decode
    n_rows, n_samples, t0 = 0, 0, time.perf_counter()
    for batch in it:
        n_rows += 1
        n_samples += len(batch["image_grid_hw"])
        if n_rows >= rows:
            break
    dt = time.perf_counter() - t0
    return n_rows / dt, n_samples / dt


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--side", type=int, default=1600)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rows", type=int, default=20, help="rows timed per configuration")
    p.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg")
    a = p.parse_args()
    torch.set_num_threads(1)  # one core in-process, like one DataLoader worker
    with tempfile.TemporaryDirectory() as d:
        size = build(os.path.join(d, "ds"), a.samples, a.side, a.image_format)
        ds = EVEPackedDataset(PackedDataConfig([os.path.join(d, "ds")], a.seq_length, a.rows + 1))
        print(f"{a.side}x{a.side} {a.image_format} ({size / 1e3:.0f} kB/image), seq {a.seq_length}, "
              f"on {os.cpu_count()} cores")
        for workers in sorted({0, 1, a.workers}):
            rows, samples = run(ds, workers, a.rows)
            cores = max(1, workers)
            print(f"workers={workers}: {rows:.2f} rows/s, {samples:.2f} samples/s, "
                  f"{samples / cores:.2f} samples/s per core")


if __name__ == "__main__":
    main()
