"""Shared builders for the data tests: tiny tokenizers, odd images, random datasets."""

from __future__ import annotations

import io
import os
from typing import List

import numpy as np
from PIL import Image

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the picture? ASSISTANT: A red cat sitting on a blue mat.",
    "Describe the image in detail. Two dogs play in the park near a tree.",
    "You are a helpful assistant. system user assistant",
    "a photo of a mountain lake at sunset, with snow on the peaks",
] * 20


def make_hf_tokenizer(folder: str) -> str:
    """Train a small byte-level BPE and save it as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return folder


def make_sp_tokenizer(folder: str) -> str:
    """Train a tiny sentencepiece model with the chat special tokens as user symbols."""
    import sentencepiece as spm

    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, "sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=prefix,
                                   vocab_size=400, model_type="bpe", byte_fallback=True,
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                                   minloglevel=2)
    return prefix + ".model"


def make_llama_sp_tokenizer(folder: str) -> str:
    """Train a tiny sentencepiece model shaped like Llama's ``tokenizer.model``: BPE, byte
    fallback, identity normalisation, whitespace kept, a dummy prefix, unk 0 / bos 1 / eos 2,
    no pad piece. Returns the folder (``tokenizer.model`` in it, no ``tokenizer.json``)."""
    import sentencepiece as spm

    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=prefix, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return folder


def random_rgb(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (JPEG-friendly) as ``[h, w, 3]`` uint8."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    """Encode a PIL image to bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bytes(w: int, h: int, seed: int) -> bytes:
    """A random RGB PNG (noise, so nothing is constant)."""
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "PNG")


def write_random_dataset(prefix: str, n: int, seed: int, max_text: int = 40,
                         image_prob: float = 0.6) -> List[int]:
    """Write a dataset of random samples (random tokens/masks, 0-2 random PNG images of
    up to 3x4 blocks at random positions) with the real writer; returns seq lengths."""
    from eve_megatron.data.indexed import IndexedDatasetWriter, StoredImage

    rng = np.random.default_rng(seed)
    w = IndexedDatasetWriter(prefix, {"test": True})
    lengths = []
    for i in range(n):
        t = int(rng.integers(2, max_text))
        tokens = rng.integers(1, 1000, t)
        mask = rng.integers(0, 2, t)
        mask[-1] = 1
        images = []
        k = int(rng.integers(1, 3)) if rng.random() < image_prob else 0
        for pos in sorted(rng.integers(0, t + 1, k)):
            hp, wp = int(rng.integers(1, 4)), int(rng.integers(1, 5))
            images.append(StoredImage(png_bytes(32 * wp, 32 * hp, seed * 100003 + i), hp, wp,
                                      int(pos)))
        w.add(tokens, mask, images)
        lengths.append(t + sum(im.num_tokens for im in images))
    w.finalize()
    return lengths
