#!/usr/bin/env python
"""Packing benchmarks: fill on realistic mixes, and C++ vs pure-Python packer speed.

Fill = real tokens / (packs x seq_length), split into image and text tokens. The
"bound" column is the best fill any packer could reach: tokens / (S x max(ceil(tokens/S),
#samples longer than S/2)), since two such samples can never share a pack.

    python tools/bench/bench_packing.py                 # everything (about 1-2 min)
    python tools/bench/bench_packing.py --speed-samples 1000000 --big-samples 10000000
"""

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from eve_megatron.data.images import anyratio_size, image_token_count  # noqa: E402
from eve_megatron.data.packing import build_pack_index  # noqa: E402
from eve_megatron.data.packing_reference import pack_reference  # noqa: E402


def image_tokens(native_w, native_h, max_size):
    w, h = anyratio_size(native_w, native_h, max_size)
    return image_token_count(h // 32, w // 32)


def make_mix(n, max_sizes, native, text_only, rng):
    """(image tokens, text tokens) per sample. Captions 10-300 tokens; aspect ratio
    log-uniform in [1/3, 3]; native: image side log-uniform 256-2048 px (never upscaled,
    so smaller images stay small), else every image is larger than max_size^2."""
    img = np.zeros(n, dtype=np.int64)
    txt = rng.integers(10, 301, n)
    ar = np.exp(rng.uniform(math.log(1 / 3), math.log(3), n))
    side = np.exp(rng.uniform(math.log(256), math.log(2048), n)) if native else None
    m = rng.choice(max_sizes, n)
    has_image = rng.random(n) >= text_only
    for i in np.nonzero(has_image)[0]:
        s = side[i] if native else 1.5 * m[i]
        img[i] = image_tokens(s * math.sqrt(ar[i]), s / math.sqrt(ar[i]), int(m[i]))
    return img, txt


MIXES = {
    "native 256-2048px, max 800/1600": dict(max_sizes=[800, 1600], native=True, text_only=0.0),
    "native, max 1600": dict(max_sizes=[1600], native=True, text_only=0.0),
    "native, max 800/1600 + 10% text-only": dict(max_sizes=[800, 1600], native=True, text_only=0.1),
    "all at 800^2": dict(max_sizes=[800], native=False, text_only=0.0),
    "all at 1600^2": dict(max_sizes=[1600], native=False, text_only=0.0),
    "all at 800^2/1600^2 50:50": dict(max_sizes=[800, 1600], native=False, text_only=0.0),
}


def fill_table(n, window, seed):
    print(f"\n## Packing fill ({n} samples per mix, window {window})\n")
    print("| mix | seq | packs | fill | image part | text part | bound |")
    print("|---|---|---|---|---|---|---|")
    for name, kw in MIXES.items():
        img, txt = make_mix(n, rng=np.random.default_rng(seed), **kw)
        lengths = img + txt
        for s in (4096, 8192):
            keep = lengths <= s
            li, lt, ll = img[keep], txt[keep], lengths[keep]
            idx = build_pack_index(ll, s, seed=seed, epoch=0, window=window)
            cap = len(idx) * s
            bound = ll.sum() / (s * max(math.ceil(ll.sum() / s), int((ll > s / 2).sum())))
            print(f"| {name} | {s} | {len(idx)} | {ll.sum() / cap:.4f} | {li.sum() / cap:.4f} "
                  f"| {lt.sum() / cap:.4f} | {bound:.4f} |")


def speed(n, big, window, seed):
    rng = np.random.default_rng(seed)
    img, txt = make_mix(n, [800, 1600], True, 0.0, rng)
    lengths = np.minimum(img + txt, 4096)
    t0 = time.perf_counter()
    cpp = build_pack_index(lengths, 4096, seed, 0, window)
    t_cpp = time.perf_counter() - t0
    t0 = time.perf_counter()
    offsets, samples = pack_reference(lengths.tolist(), 4096, seed, 0, window)
    t_py = time.perf_counter() - t0
    same = np.array_equal(cpp.offsets, offsets) and np.array_equal(cpp.samples, samples)
    print(f"\n## Packer speed (seq 4096, window {window})\n")
    print(f"- {n} samples: C++ {t_cpp:.3f} s, Python reference {t_py:.2f} s, "
          f"speed-up {t_py / t_cpp:.0f}x, identical output: {same}")
    big_lengths = np.tile(lengths, math.ceil(big / n))[:big]
    t0 = time.perf_counter()
    idx = build_pack_index(big_lengths, 4096, seed, 0, window)
    print(f"- {big} samples: C++ {time.perf_counter() - t0:.2f} s ({len(idx)} packs)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fill-samples", type=int, default=200_000)
    p.add_argument("--speed-samples", type=int, default=1_000_000)
    p.add_argument("--big-samples", type=int, default=10_000_000)
    p.add_argument("--window", type=int, default=10000)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    fill_table(a.fill_samples, a.window, a.seed)
    speed(a.speed_samples, a.big_samples, a.window, a.seed)


if __name__ == "__main__":
    main()
