"""Step time of the routed EVEv2 model ('all') vs the dense model ('none'), one run.

Both models have the same active parameters per token (the routed one holds a vision copy
of every layer weight, each token uses one). A fixed batch with about half of its tokens
vision is timed forward + backward, alternating the two models, and the ratio of median
step times is printed (goal <= 1.05).

    python tools/bench/bench_routing.py                          # CPU, fp32
    python tools/bench/bench_routing.py --device cuda --dtype bf16 --hidden 2048 --layers 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, help="model shape from a preset (overrides dims)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak of the GPU for MFU (H100 SXM: 989)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "flash_attn", "te"])
    p.add_argument("--ce-fusion", action="store_true",
                   help="Megatron's fused vocab-parallel cross entropy ('native')")
    p.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"])
    return p.parse_args()


def _batch(args, device, vocab):
    """Each row: one image taking ~half the row (1 + h'(w'+1) tokens), then text."""
    from eve_megatron.models.eve import images_to_blocks

    gh = max(1, int((args.seq // 2) ** 0.5))
    gw = max(1, (args.seq // 2 - 1) // gh - 1)
    n_img = 1 + gh * (gw + 1)
    g = torch.Generator().manual_seed(0)
    is_vision = torch.zeros(args.batch, args.seq, dtype=torch.bool)
    is_vision[:, 1:1 + n_img] = True
    images = [torch.randn(3, 32 * gh, 32 * gw, generator=g) for _ in range(args.batch)]
    pixel_values, grid = images_to_blocks(images)
    labels = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    labels[is_vision] = -100
    batch = dict(tokens=torch.randint(0, vocab, (args.batch, args.seq), generator=g),
                 position_ids=torch.arange(args.seq).repeat(args.batch, 1), is_vision=is_vision,
                 pixel_values=pixel_values, image_grid_hw=grid, labels=labels)
    return {k: v.to(device) for k, v in batch.items()}, n_img / args.seq


def _model(args, decoupling, device):
    from eve_megatron.models.eve import EVEModel, eve_config

    dims = dict(num_layers=args.layers) if args.preset else dict(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_query_groups=args.kv_heads, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
        vision_hidden_size=256)
    cfg = eve_config(
        args.preset or "tiny", **dims, decoupling=decoupling, core_attention_impl=args.attention,
        transformer_impl=args.transformer_impl, bf16=args.dtype == "bf16",
        params_dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
        use_cpu_initialization=device == "cpu", cross_entropy_loss_fusion=args.ce_fusion,
        cross_entropy_fusion_impl="native")
    return EVEModel(cfg).to(device)


def _step(model, batch, device):
    loss = model(**batch).sum()
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    args = _args()
    from eve_megatron.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig())
    from eve_megatron.models.eve.flops import model_flops_per_token, parameter_counts

    device = args.device
    models = {d: _model(args, d, device) for d in ("none", "all")}
    cfg = models["all"].config
    batch, vision_fraction = _batch(args, device, cfg.vocab_size)
    times = {d: [] for d in models}
    order = list(models)
    for i in range(args.warmup + args.iters):
        # ABBA order: whichever runs first after the other's frees pays the allocator's
        # page faults (seen on CPU), so neither model is always first.
        for d in (order if i % 2 == 0 else order[::-1]):
            model = models[d]
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            _step(model, batch, device)
            if i >= args.warmup:
                times[d].append(time.perf_counter() - t0)
    med = {d: statistics.median(t) for d, t in times.items()}
    tokens = args.batch * args.seq
    tflops = {d: model_flops_per_token(cfg, args.seq) * tokens / t / 1e12 for d, t in med.items()}
    result = {"device": device if device == "cpu" else torch.cuda.get_device_name(),
              "dtype": args.dtype, "preset": args.preset, "hidden": cfg.hidden_size,
              "layers": cfg.num_layers, "params_routed": parameter_counts(cfg).total,
              "attention": cfg.attention_impl, "ce_fusion": args.ce_fusion,
              "tokens": args.batch * args.seq, "vision_fraction": round(vision_fraction, 3),
              "step_s_routed": round(med["all"], 4), "step_s_dense": round(med["none"], 4),
              "ratio_routed_over_dense": round(med["all"] / med["none"], 4),
              "ratio_of_min_times": round(min(times["all"]) / min(times["none"]), 4),
              "steps_s_routed": [round(t, 3) for t in times["all"]],
              "steps_s_dense": [round(t, 3) for t in times["none"]],
              "tflops_routed": round(tflops["all"], 2), "tflops_dense": round(tflops["none"], 2)}
    if device == "cuda":
        result["mfu_routed"] = round(tflops["all"] / args.peak_tflops, 4)
        result["mfu_dense"] = round(tflops["none"] / args.peak_tflops, 4)
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
