#!/usr/bin/env python
"""Answer held-out questions with a trained checkpoint (greedy decoding with the Megatron
model) and print ``heldout_accuracy=<value>``.

The questions come from a preprocessed dataset (``--data PREFIX``, qwen2 template, one
question per sample): the prompt is everything before the first supervised token, the
reference answer is the supervised text. An answer is correct when the decoded text (up
to ``<|im_end|>``) equals the reference. ``--shuffled-images-control`` also answers every
question with another sample's image: a model that reads the pixels then drops to about
chance level.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from eve_megatron.data.dataset import build_row  # noqa: E402
from eve_megatron.data.indexed import IndexedDataset, StoredSample  # noqa: E402
from eve_megatron.data.loader import collate_rows  # noqa: E402
from eve_megatron.data.tokenizer import load_tokenizer  # noqa: E402


def load_model(root: str):
    """The checkpoint's model at TP=PP=1 in this process (any saved layout loads)."""
    from eve_megatron.models.eve.config import config_from_fields
    from eve_megatron.parallel import ParallelConfig, initialize_parallel
    from eve_megatron.training import checkpointing
    from eve_megatron.training.model_setup import build_model_chunks

    initialize_parallel(ParallelConfig())
    cfg = config_from_fields(checkpointing.read_model_fields(root), pipeline_dtype=torch.float32)
    chunks = build_model_chunks(cfg)
    iteration, _ = checkpointing.load_checkpoint(root, chunks)
    chunks[0].eval()
    return chunks[0], iteration


@torch.no_grad()
def greedy(model, prompts, images, end_id: int, max_new: int = 4, batch: int = 64):
    """Greedy continuation of every prompt (token lists); stops at ``end_id``."""
    outs = [[] for _ in prompts]
    for start in range(0, len(prompts), batch):
        idx = list(range(start, min(start + batch, len(prompts))))
        done = [False] * len(idx)
        for _ in range(max_new):
            seqs = [np.asarray(list(prompts[i]) + outs[i], dtype=np.int64) for i in idx]
            lens = [len(s) + sum(im.num_tokens for im in images[i]) for s, i in zip(seqs, idx)]
            width = max(lens)
            rows = [build_row([StoredSample(s, np.zeros(len(s), np.uint8), images[i])], width)
                    for s, i in zip(seqs, idx)]
            b = collate_rows(rows)
            logits = model(b["tokens"], b["position_ids"], b["is_vision"], b["cu_seqlens"],
                           b["max_seqlen"], b["pixel_values"], b["image_grid_hw"])
            for k, i in enumerate(idx):
                if not done[k]:
                    tok = int(logits[k, lens[k] - 1].argmax())
                    outs[i].append(tok)
                    done[k] = tok == end_id
            if all(done):
                break
    return outs


def question_kind(prompt: str) -> str:
    """colour, shape or position (the quickstart's question families)."""
    question = prompt.split("USER:")[-1]
    if "left" in question:
        return "position"
    return "colour" if "colour" in question else "shape"


def evaluate(model, data: IndexedDataset, tok, shuffle_images: bool = False, seed: int = 0):
    """``(accuracy, per-question-kind accuracy)``."""
    end_id = tok.token_id("<|im_end|>")
    prompts, images, refs, kinds = [], [], [], []
    for i in range(len(data)):
        s = data.get(i)
        first = int(np.argmax(s.loss_mask))
        prompts.append(s.tokens[:first])
        images.append(s.images)
        refs.append(tok.decode(s.tokens[first:]).replace("<|im_end|>", "").strip())
        kinds.append(question_kind(tok.decode(s.tokens[:first])))
    if shuffle_images:
        perm = np.random.default_rng(seed).permutation(len(images))
        images = [images[j] for j in perm]
    answers = greedy(model, prompts, images, end_id)
    right, per = 0, defaultdict(lambda: [0, 0])
    for ans, ref, kind in zip(answers, refs, kinds):
        text = tok.decode([t for t in ans if t != end_id]).strip()
        ok = text == ref
        right += ok
        per[kind][0] += ok
        per[kind][1] += 1
    return right / max(len(refs), 1), {k: v[0] / v[1] for k, v in per.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="checkpoint folder")
    p.add_argument("--data", required=True, help="preprocessed held-out questions (PREFIX)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--shuffled-images-control", action="store_true")
    a = p.parse_args(argv)
    model, iteration = load_model(a.load)
    data, tok = IndexedDataset(a.data), load_tokenizer(a.tokenizer)
    acc, per = evaluate(model, data, tok)
    print(json.dumps({"checkpoint_iteration": iteration, "questions": len(data),
                      "per_question": per}), flush=True)
    if a.shuffled_images_control:
        control, _ = evaluate(model, data, tok, shuffle_images=True)
        print(f"control_accuracy_shuffled_images={control:.4f}", flush=True)
    print(f"heldout_accuracy={acc:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
