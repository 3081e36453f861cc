#!/usr/bin/env python
"""Preprocessing throughput: caption JSONL with photo-like JPEGs through the real CLI path.

    python tools/bench/bench_preprocess.py --images 96 --side 2000 --workers 2
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_loader import photo  # noqa: E402
from eve_megatron.data.images import ImageConfig  # noqa: E402
from eve_megatron.data.preprocess import PreprocessConfig, run_preprocess  # noqa: E402


def make_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|im_end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a photo of a mountain lake at sunset with snow"] * 50, trainer)
    os.makedirs(folder)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--side", type=int, default=2000)
    p.add_argument("--max-image-size", type=int, default=1600)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "img"))
        for i in range(8):
            photo(a.side, i).save(os.path.join(d, "img", f"{i}.jpg"), quality=90)
        with open(os.path.join(d, "caps.jsonl"), "w") as f:
            for i in range(a.images):
                f.write(json.dumps({"image": f"{i % 8}.jpg", "caption": "a photo of a lake"}) + "\n")
        cfg = PreprocessConfig(inputs=[os.path.join(d, "caps.jsonl")], output_prefix=os.path.join(d, "o"),
                               tokenizer=make_tokenizer(os.path.join(d, "tok")), template="plain",
                               image_root=os.path.join(d, "img"), seq_length=8192,
                               image=ImageConfig(max_size=a.max_image_size), workers=a.workers,
                               progress=False)
        t0 = time.perf_counter()
        summary = run_preprocess(cfg)
        dt = time.perf_counter() - t0
    print(f"{a.images} images {a.side}x{a.side} -> max {a.max_image_size}^2, workers={a.workers}: "
          f"{summary['written'] / dt:.1f} samples/s ({summary['written'] / dt / max(1, a.workers):.1f} "
          f"per worker)")


if __name__ == "__main__":
    main()
