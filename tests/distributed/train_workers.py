"""Rank functions of the distributed training-path tests (DDP, optimizer, schedules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from eve_megatron.models.eve import EVEModel, eve_config
from eve_megatron.models.eve.sharding import gather_full, load_full_state_dict
from eve_megatron.parallel import ParallelConfig, initialize_parallel
from eve_megatron.training.model_setup import build_model_chunks, wrap_ddp
from tests.distributed.model_workers import SEQ, _micro_batches, _reduced_loss, _run, global_rows
from tests.reference_eve import RefShape, collate_rows, make_batch, make_weights, model_batch, to_megatron


def gpt_equivalence(tp: int):
    """decoupling='none' vs Megatron-Core GPTModel (local spec) with the same weights."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp))
    shape = RefShape(decoupling="none")
    full = to_megatron(make_weights(shape, seed=3), shape)
    eve = EVEModel(eve_config("tiny", decoupling="none", tensor_model_parallel_size=tp))
    load_full_state_dict(eve, full)
    gcfg = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, normalization="RMSNorm", layernorm_epsilon=1e-6,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, use_cpu_initialization=True)
    gpt = GPTModel(gcfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=512,
                   max_sequence_length=SEQ, position_embedding_type="rope", rotary_base=10000)
    load_full_state_dict(gpt, {k: v for k, v in full.items() if "patch_embedding" not in k})
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 512, (2, SEQ), generator=g)
    labels = torch.randint(0, 512, (2, SEQ), generator=g)
    pos = torch.arange(SEQ).repeat(2, 1)
    out = {}
    for name, model, kwargs in (
        ("eve", eve, dict(is_vision=torch.zeros(2, SEQ, dtype=torch.bool))),
        ("gpt", gpt, dict(attention_mask=None)),
    ):
        logits = model(tokens, pos, **kwargs)
        loss = model(tokens, pos, labels=labels, **kwargs).sum()
        loss.backward()
        grads = gather_full(model, grads=True)
        out[name] = {"logits": tensor_parallel.gather_from_tensor_model_parallel_region(logits),
                     "grads": {k: v for k, v in grads.items() if "patch_embedding" not in k}}
    return out


def _optimizer(ddp, lr=3e-3):
    return get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, use_distributed_optimizer=True,
                        bf16=False, clip_grad=1.0), ddp)


def _train_steps(chunks, ddp, opt, micro, mbs, steps):
    losses = []
    for _ in range(steps):
        for m in ddp:
            m.zero_grad_buffer()
        opt.zero_grad()
        reported = _run(chunks, ddp, micro, mbs, forward_only=False)
        ok, grad_norm, _ = opt.step()
        if ps.is_pipeline_last_stage():
            total = _reduced_loss(reported)
            losses.append((total[0] / total[1]).item())
    return losses


def text_only_overlap():
    """A text-only micro-batch trains under DDP with overlapped grad reduce (DP=2)."""
    initialize_parallel(ParallelConfig())
    cfg = eve_config("tiny", pipeline_dtype=torch.float32)
    chunks = build_model_chunks(cfg)
    ddp = wrap_ddp(chunks, cfg, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=True,
        bucket_size=20000))
    opt = _optimizer(ddp)
    vision = {n: p.detach().clone() for n, p in chunks[0].named_parameters()
              if "vision_" in n or "patch_embedding" in n}
    text = {n: p.detach().clone() for n, p in chunks[0].named_parameters() if n not in vision}
    shape = RefShape()
    text_rows = [make_batch(shape, 1, SEQ, seed=50 + i, with_images=False) for i in range(4)]
    losses = _train_steps(chunks, ddp, opt, _micro_batches(text_rows, 1), 1, steps=2)
    params = dict(chunks[0].named_parameters())
    out = {"losses": losses,
           "vision_unchanged": all(torch.equal(params[n], v) for n, v in vision.items()),
           "text_changed": sum(not torch.equal(params[n], v) for n, v in text.items()),
           "n_text": len(text), "n_buckets": len(ddp[0].bucket_groups)}
    mixed = global_rows(shape, 4, seed=70)
    _train_steps(chunks, ddp, opt, _micro_batches(mixed, 1), 1, steps=1)
    out["vision_changed_after_images"] = sum(
        not torch.equal(params[n], v) for n, v in vision.items())
    out["n_vision"] = len(vision)
    return out


def train_tp2_pp2(steps: int = 6):
    """A few TP2 x PP2 steps with the distributed optimizer on a fixed batch."""
    initialize_parallel(ParallelConfig(2, 2))
    cfg = eve_config("tiny", tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                     pipeline_dtype=torch.float32)
    chunks = build_model_chunks(cfg)
    ddp = wrap_ddp(chunks, cfg, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=True))
    opt = _optimizer(ddp)
    micro = [model_batch(collate_rows(global_rows(RefShape(), 4, seed=90)[i:i + 2]))
             for i in (0, 2)]
    return _train_steps(chunks, ddp, opt, micro, 2, steps)


def two_rank_suite():
    """Everything the 2-rank tests need, in one launch (process start-up dominates)."""
    out = {"gpt": gpt_equivalence(tp=2), "text_only": text_only_overlap()}
    initialize_parallel(ParallelConfig(tensor_model_parallel_size=2))
    out["microbatch"] = _microbatch_tp2()
    return out


def _microbatch_tp2():
    shape = RefShape()
    full = to_megatron(make_weights(shape, seed=11), shape)
    rows = global_rows(shape, 8, seed=300)
    results = {}
    for mbs in (1, 2, 8):
        cfg = eve_config("tiny", tensor_model_parallel_size=2, pipeline_dtype=torch.float32)
        chunks = build_model_chunks(cfg)
        load_full_state_dict(chunks[0], full)
        ddp = wrap_ddp(chunks, cfg)
        losses = _run(chunks, ddp, _micro_batches(rows, mbs), mbs, forward_only=False)
        per_micro = [(e["lm loss"][0] / e["lm loss"][1]).item() for e in losses]
        results[mbs] = {"loss": _reduced_loss(losses), "grads": gather_full(chunks[0], grads=True),
                        "mean_of_means": sum(per_micro) / len(per_micro)}
    return results
