#!/usr/bin/env python
"""Time the trainer's own training step: routed EVEv2 vs dense EVE vs Megatron-Core's GPTModel.

One step = what ``Trainer.train_step`` does: the Megatron schedule's forward and backward
over ``global / (micro * dp)`` packed micro-batches (cu_seqlens, images about half the
tokens), gradient reduction, the distributed-optimizer step and the LR schedule. Three
trainers share one set of process groups: (a) ``decoupling=all`` (routed), (b)
``decoupling=none`` (dense, same active parameters), (c) Megatron-Core's ``GPTModel`` of
(b)'s shape (local spec, or the TE spec with ``--transformer-impl transformer_engine``;
its attention is Megatron's own: causal over the whole row, packing ignored). They run
in ABBA order (a b c, c b a, ...) and the ratios of median step times a/b and b/c are
printed, per attention backend. Left out: data loading (fixed micro-batches, read once
from our loader) and checkpointing. MFU counts ``models/eve/flops.py``'s FLOPs, as the
trainer's log does.

    python tools/bench/bench_train_step.py                             # CPU, tiny widths
    python tools/bench/bench_train_step.py --preset qwen2.5-7b --layers 4 --seq 4096 \\
        --bf16 --attention torch_varlen flex --peak-tflops 989          # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layers")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (tiny preset only)")
    p.add_argument("--ffn", type=int, default=704, help="MLP width (tiny preset only)")
    p.add_argument("--heads", type=int, default=8, help="query heads (tiny preset only)")
    p.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4, help="ABBA rounds after one warm-up round")
    p.add_argument("--attention", nargs="+", default=["sdpa", "flex"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp8-format", default=None, choices=["e4m3", "hybrid"],
                   help="TE FP8 GEMMs (with --transformer-impl transformer_engine)")
    p.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"])
    p.add_argument("--peak-tflops", type=float, default=None, help="per-GPU peak for MFU")
    p.add_argument("--world", type=int, default=1, help="local ranks (data parallel)")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    return p.parse_args(argv)


def write_dataset(prefix: str, seq: int, n: int = 96, vocab: int = 500, seed: int = 0) -> str:
    """Caption-like samples of about ``seq / 3`` tokens, half of them one image's."""
    import io

    import numpy as np
    from PIL import Image

    from eve_megatron.data.indexed import IndexedDatasetWriter, StoredImage
    from eve_megatron.hf.eve_image_rules import image_token_count

    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(prefix, {"vocab_size": vocab, "image": {"max_size": 1600,
                                                                           "alpha": "drop"}})
    for _ in range(n):
        target = int(rng.integers(seq // 5, seq // 2))
        hp = max(1, int((target / 2) ** 0.5))
        wp = max(1, (target // 2 - 1) // hp - 1)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32 * hp, 32 * wp, 3), dtype=np.uint8)).save(buf, "PNG")
        t = max(4, target - image_token_count(hp, wp))
        writer.add(rng.integers(1, vocab, t), np.ones(t, dtype=np.int64),
                   [StoredImage(buf.getvalue(), hp, wp, 0)])
    writer.finalize()
    return prefix


def _flags(a, data: str, decoupling: str, attention: str):
    flags = ["--model-preset", a.preset, "--decoupling", decoupling, "--data-path", data,
             "--seq-length", a.seq, "--micro-batch-size", a.micro_batch,
             "--global-batch-size", a.global_batch, "--train-iters", 1000, "--lr", 1e-4,
             "--num-workers", 0, "--attention-backend", attention,
             "--transformer-impl", a.transformer_impl, "--max-position-embeddings", a.seq]
    if a.preset == "tiny":
        flags += ["--hidden-size", a.hidden, "--ffn-hidden-size", a.ffn,
                  "--num-attention-heads", a.heads, "--num-query-groups", max(1, a.heads // 4)]
    if a.layers:
        flags += ["--num-layers", a.layers]
    if a.vocab:
        flags += ["--vocab-size", a.vocab]
    if a.bf16:
        flags += ["--bf16"]
    if a.fp8_format:
        flags += ["--fp8-format", a.fp8_format]
    return [str(x) for x in flags]


def gpt_anchor(cfg, dense_config):
    """Megatron-Core's GPTModel of the dense model's shape, as (chunks, config)."""
    import dataclasses

    import torch
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    gcfg = TransformerConfig(**{f.name: getattr(dense_config, f.name)
                                for f in dataclasses.fields(TransformerConfig) if f.init})
    spec = (specs.get_gpt_layer_with_transformer_engine_spec()
            if cfg.model.transformer_impl == "transformer_engine"
            else specs.get_gpt_layer_local_spec(normalization="RMSNorm"))
    model = GPTModel(gcfg, spec, vocab_size=dense_config.vocab_size,
                     max_sequence_length=dense_config.max_sequence_length,
                     position_embedding_type="rope", rotary_base=int(dense_config.rotary_base))
    if torch.cuda.is_available():
        model = model.cuda(torch.cuda.current_device())
    if cfg.model.bf16:
        model = model.bfloat16()
    gcfg.vocab_size = dense_config.vocab_size
    return [model], gcfg


def gpt_forward_step(data_iterator, model):
    """Our batch on GPTModel: tokens, positions and labels (image positions are text ids)."""
    from functools import partial

    from eve_megatron.training.step import batch_to_device, loss_func

    batch = next(data_iterator)
    batch = batch_to_device(batch, next(model.parameters()).device)
    labels = batch["labels"].clamp(min=0)
    out = model(batch["tokens"], batch["position_ids"], None, labels=labels)
    return out, partial(loss_func, batch["loss_mask"])


def _fixed_microbatches(trainer, n: int):
    return [next(trainer.stream) for _ in range(n)]


def _timed_step(trainer, micro) -> float:
    import torch

    from eve_megatron.training.data_setup import StepData

    data = StepData(iter(micro), len(micro), len(trainer.chunks))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = trainer.train_step(data)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if result.skipped:
        raise RuntimeError("a benchmark step was skipped (non-finite loss or gradients)")
    return time.perf_counter() - start


def _one_backend(a, data: str, attention: str) -> dict:
    import torch

    from eve_megatron.models.eve.flops import model_flops_per_token
    from eve_megatron.parallel import initialize_parallel
    from eve_megatron.pretrain import build_trainer
    from eve_megatron.training.arguments import parse_config

    world = torch.distributed.get_world_size()
    cfgs = {k: parse_config(_flags(a, data, d, attention)) for k, d in (("routed", "all"),
                                                                         ("dense", "none"))}
    for c in cfgs.values():
        c.validate(world)
    initialize_parallel(cfgs["routed"].parallel, seed=1234)
    trainers = {k: build_trainer(c) for k, c in cfgs.items()}
    chunks, gcfg = gpt_anchor(cfgs["dense"], trainers["dense"].model_config)
    trainers["gpt"] = build_trainer(cfgs["dense"], gpt_forward_step, chunks=chunks, model_config=gcfg)
    micro = _fixed_microbatches(trainers["routed"], cfgs["routed"].num_microbatches(world))
    names = list(trainers)
    for name in names:  # warm-up round (allocator, kernels, compilation)
        _timed_step(trainers[name], micro)
    times = {name: [] for name in names}
    for r in range(a.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(_timed_step(trainers[name], micro))
    median = {k: statistics.median(v) for k, v in times.items()}
    tokens = a.global_batch * a.seq
    flops = tokens * model_flops_per_token(trainers["dense"].model_config, a.seq)
    out = {"attention": trainers["routed"].model_config.attention_impl,
           "step_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
           "median_s": {k: round(v, 4) for k, v in median.items()},
           "routed_over_dense": round(median["routed"] / median["dense"], 4),
           "dense_over_gpt": round(median["dense"] / median["gpt"], 4),
           "tokens_per_s": {k: round(tokens / v, 1) for k, v in median.items()},
           "tflops_per_gpu": {k: round(flops / v / 1e12 / world, 3) for k, v in median.items()}}
    if a.peak_tflops:
        out["mfu"] = {k: round(v / a.peak_tflops, 4) for k, v in out["tflops_per_gpu"].items()}
    return out


def rank_main(args: dict, data: str) -> dict:
    """Rank function: every requested attention backend, each with its three trainers."""
    a = argparse.Namespace(**args)
    return {attention: _one_backend(a, data, attention) for attention in a.attention}


def main(argv=None) -> int:
    a = _args(argv)
    from eve_megatron.launch import run_distributed

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        data = write_dataset(os.path.join(tmp, "data"), a.seq)
        start = time.time()
        results = run_distributed("bench_train_step:rank_main", a.world, timeout=6 * 3600,
                                  args=vars(a), data=data)[0]
    for attention, r in results.items():
        print(f"{attention:>12}: routed/dense {r['routed_over_dense']:.3f} (goal <= 1.05), "
              f"dense/GPTModel {r['dense_over_gpt']:.3f} (goal <= 1.03); median step s "
              f"{r['median_s']}; tokens/s {r['tokens_per_s']}", flush=True)
    summary = {"config": vars(a), "results": results, "seconds": round(time.time() - start, 1)}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
