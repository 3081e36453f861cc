#!/usr/bin/env python
"""Synthetic image-text data for the quickstart: coloured shapes on images of random size.

Every image (sides random multiples of 32 in [64, 128], so random aspect ratios) shows
one shape (circle, square or triangle) in one of six colours, in the left or right part
of a light, noisy background. Writes, under ``--out``:

    images/train_000000.png ...       images/heldout_000000.png ...
    captions.jsonl                    {"image", "caption"}: "a red circle on the left"
    qa_train.json                     LLaVA list: the three questions in random order
    qa_heldout.json                   one question per sample (held-out images only)
    tokenizer/                        a byte-level BPE (HF folder) trained on the texts

Nothing is downloaded; the output depends only on ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 35, 35), "green": (35, 160, 50), "blue": (40, 70, 215),
           "yellow": (235, 205, 25), "purple": (135, 45, 170), "orange": (240, 135, 25)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right")
QUESTIONS = {
    "colour": ["What colour is the shape?", "Which colour does the shape have?"],
    "shape": ["What shape is it?", "Which shape is shown?"],
    "position": ["Is the shape on the left or the right?", "Where is the shape, left or right?"],
}
SYSTEM_PROMPT = "Answer."
SIDES = (64, 96, 128)


def draw_image(rng: np.random.Generator):
    """One image and its attributes ``(colour, shape, position)``."""
    w, h = int(rng.choice(SIDES)), int(rng.choice(SIDES))
    colour, shape, position = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)),
                               str(rng.choice(POSITIONS)))
    bg = rng.integers(175, 250, 3)
    pixels = np.clip(bg + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    size = int(rng.integers(20, 29))
    r = size / 2
    col = 0 if position == "left" else w // 32 - 1  # the leftmost or rightmost block column
    row = int(rng.integers(h // 32))
    cx = 32 * col + float(rng.uniform(r + 1, 31 - r))
    cy = 32 * row + float(rng.uniform(r + 1, 31 - r))
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(img)
    fill = tuple(int(c) for c in np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255))
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img, {"colour": colour, "shape": shape, "position": position}


def answers(attrs: dict) -> dict:
    return {"colour": attrs["colour"], "shape": attrs["shape"], "position": attrs["position"]}


def caption(attrs: dict) -> str:
    return f"a {attrs['colour']} {attrs['shape']} on the {attrs['position']}"


def write_split(out: str, name: str, n: int, rng: np.random.Generator):
    """Draw ``n`` images of split ``name``; returns ``[(relative path, attrs)]``."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    items = []
    for i in range(n):
        img, attrs = draw_image(rng)
        rel = f"images/{name}_{i:06d}.jpg"
        img.save(os.path.join(out, rel), quality=92)
        items.append((rel, attrs))
    return items


def qa_sample(rel: str, attrs: dict, kinds, rng, sid: str) -> dict:
    conv = []
    for k, kind in enumerate(kinds):
        q = QUESTIONS[kind][int(rng.integers(len(QUESTIONS[kind])))]
        conv.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q})
        conv.append({"from": "gpt", "value": answers(attrs)[kind]})
    return {"id": sid, "image": rel, "conversations": conv}


def train_tokenizer(texts, folder: str, vocab_size: int = 400) -> None:
    """Byte-level BPE with the chat special tokens, saved as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder + "", "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "model_max_length": 4096}, f, indent=1)


def train_sentencepiece(texts, folder: str, vocab_size: int = 400) -> None:
    """A Llama-shaped sentencepiece ``tokenizer.model`` (BPE, byte fallback, unk 0 / bos 1 /
    eos 2) for the EVEv1 quickstart (its templates use ``<s>`` and ``</s>``)."""
    import sentencepiece as spm

    os.makedirs(folder, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=os.path.join(folder, "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--heldout-images", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sentencepiece", action="store_true",
                   help="also write a Llama-style sentencepiece tokenizer to OUT/tokenizer_sp (EVEv1)")
    a = p.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    train = write_split(a.out, "train", a.train_images, rng)
    heldout = write_split(a.out, "heldout", a.heldout_images, rng)
    kinds = list(QUESTIONS)
    with open(os.path.join(a.out, "captions.jsonl"), "w") as f:
        for rel, attrs in train:
            f.write(json.dumps({"image": rel, "caption": caption(attrs)}) + "\n")
    qa = [qa_sample(rel, attrs, list(rng.permutation(kinds)), rng, f"train_{i}")
          for i, (rel, attrs) in enumerate(train)]
    held = [qa_sample(rel, attrs, [kind], rng, f"heldout_{i}_{kind}")
            for i, (rel, attrs) in enumerate(heldout) for kind in kinds]
    for name, data in (("qa_train.json", qa), ("qa_heldout.json", held)):
        with open(os.path.join(a.out, name), "w") as f:
            json.dump(data, f)
    texts = [SYSTEM_PROMPT + " USER: ASSISTANT:"] * 50
    texts += [caption(at) for _, at in train] + [q for qs in QUESTIONS.values() for q in qs] * 50
    train_tokenizer(texts, os.path.join(a.out, "tokenizer"))
    if a.sentencepiece:
        train_sentencepiece(texts, os.path.join(a.out, "tokenizer_sp"))
    print(json.dumps({"train_images": len(train), "heldout_images": len(heldout),
                      "qa_train": len(qa), "qa_heldout": len(held)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
