"""Small indexed datasets for the training tests (tokens below the tiny preset's vocab)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from eve_megatron.data.indexed import IndexedDatasetWriter, StoredImage


def _png(hp: int, wp: int, rng: np.random.Generator) -> bytes:
    small = rng.integers(0, 256, (hp * 4, wp * 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((32 * wp, 32 * hp), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


TRAIN_IMAGES = {"max_size": 96, "alpha": "drop"}
"""The image settings the training datasets' metadata records (as preprocessing does)."""


def write_train_dataset(prefix: str, n: int = 64, seed: int = 0, vocab: int = 500,
                        text_only_fraction: float = 0.2) -> str:
    """Caption-like samples: one image of 1x1..2x3 blocks (most samples) then 4-20 tokens,
    all text supervised; some text-only samples. Returns ``prefix``."""
    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(prefix, {"test": True, "vocab_size": vocab, "image": TRAIN_IMAGES})
    for _ in range(n):
        t = int(rng.integers(4, 21))
        tokens = rng.integers(1, vocab, t)
        mask = np.ones(t, dtype=np.int64)
        images = []
        if rng.random() >= text_only_fraction:
            hp, wp = int(rng.integers(1, 3)), int(rng.integers(1, 4))
            images.append(StoredImage(_png(hp, wp, rng), hp, wp, 0))
        writer.add(tokens, mask, images)
    writer.finalize()
    return prefix


def write_learnable_dataset(prefix: str, n: int = 96, seed: int = 0, period: int = 16,
                            text_only_fraction: float = 0.2) -> str:
    """Like :func:`write_train_dataset`, but every text is a counting run over ``period``
    ids (``a, a+1, ...`` mod ``period``, as ids ``1..period``): each token after the first
    follows from the one before, so a training run drives the loss from ~ln(vocab) towards
    0 within a few steps, far more than any rounding tolerance. Returns ``prefix``."""
    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(prefix, {"test": True, "vocab_size": period + 1,
                                           "image": TRAIN_IMAGES})
    for _ in range(n):
        t = int(rng.integers(8, 21))
        tokens = 1 + (int(rng.integers(period)) + np.arange(t)) % period
        images = []
        if rng.random() >= text_only_fraction:
            hp, wp = int(rng.integers(1, 3)), int(rng.integers(1, 4))
            images.append(StoredImage(_png(hp, wp, rng), hp, wp, 0))
        writer.add(tokens, np.ones(t, dtype=np.int64), images)
    writer.finalize()
    return prefix
