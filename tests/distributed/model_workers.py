"""Functions run on every rank by the distributed model tests (see eve_megatron.launch)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from eve_megatron.models.eve import eve_config
from eve_megatron.models.eve.sharding import gather_full, load_full_state_dict
from eve_megatron.parallel import ParallelConfig, initialize_parallel
from eve_megatron.training.model_setup import build_model_chunks, wrap_ddp
from eve_megatron.training.step import MODEL_INPUTS, batch_to_device, forward_step
from tests.reference_eve import RefShape, collate_rows, make_batch, make_weights, model_batch, to_megatron

SEQ = 64


def global_rows(shape: RefShape, n_rows: int, seed: int = 100, **kwargs):
    """The global batch used by the distributed tests: one packed row per seed."""
    return [make_batch(shape, 1, SEQ, seed=seed + i, **kwargs) for i in range(n_rows)]


def _micro_batches(rows, mbs):
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = len(rows) // dp
    mine = rows[dp_rank * per:(dp_rank + 1) * per]
    return [model_batch(collate_rows(mine[i:i + mbs])) for i in range(0, per, mbs)]


def _logits_step(data_iterator, model):
    batch = batch_to_device(next(data_iterator), "cpu")
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch and k != "labels"}
    return model(**inputs), (lambda out, non_loss_data=False: out)


def _run(chunks, ddp, micro, mbs, forward_only, step=forward_step):
    vp = len(chunks) > 1
    iters = [iter(micro) for _ in chunks] if vp else iter(micro)
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iters, model=ddp if vp else ddp[0],
        num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=mbs,
        forward_only=forward_only, collect_non_loss_data=forward_only)


def _reduced_loss(losses):
    total = torch.zeros(2)
    for entry in losses:
        total += entry["lm loss"]
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
    return total


def layout_equivalence(layouts, decoupling="all", tied=False, n_rows=4, attention="sdpa"):
    """For each (tp, pp, sp, vp, mbs) layout: logits, mean loss and gradients of one step
    with the ``attention`` backend."""
    shape = RefShape(decoupling=decoupling, tied=tied)
    full = to_megatron(make_weights(shape, seed=7), shape)
    rows = global_rows(shape, n_rows)
    results = []
    for tp, pp, sp, vp, mbs in layouts:
        initialize_parallel(ParallelConfig(tp, pp, vp, sp))
        cfg = eve_config("tiny", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         virtual_pipeline_model_parallel_size=vp, sequence_parallel=sp,
                         decoupling=decoupling, share_embeddings_and_output_weights=tied,
                         pipeline_dtype=torch.float32, core_attention_impl=attention)
        chunks = build_model_chunks(cfg)
        for chunk in chunks:
            load_full_state_dict(chunk, full)
        ddp = wrap_ddp(chunks, cfg)
        micro = _micro_batches(rows, mbs)
        logits = _run(chunks, ddp, micro, mbs, forward_only=True, step=_logits_step)
        for m in ddp:
            m.zero_grad_buffer()
        loss = _reduced_loss(_run(chunks, ddp, micro, mbs, forward_only=False))
        out = {"layout": (tp, pp, sp, vp, mbs), "dp_rank": ps.get_data_parallel_rank(),
               "last": ps.is_pipeline_last_stage(), "tp_rank": ps.get_tensor_model_parallel_rank()}
        if logits:
            logits = [tensor_parallel.gather_from_tensor_model_parallel_region(x) for x in logits]
            out["logits"] = torch.cat(logits)
            out["loss"] = loss
        grads = {}
        for chunk in chunks:
            grads.update(gather_full(chunk, grads=True))
        if out["tp_rank"] == 0 and out["dp_rank"] == 0:
            out["grads"] = grads
        results.append(out)
    return results
