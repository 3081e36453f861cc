"""Rank functions of the EVEv1 parallel tests."""

import torch
from megatron.core import parallel_state

from eve_megatron.models.eve.sharding import gather_full, load_full_state_dict
from eve_megatron.models.evev1 import EVEv1Model
from eve_megatron.parallel import ParallelConfig, initialize_parallel


def tp_sp_step(tp: int, sequence_parallel: bool, hd: bool = False):
    """EVEv1 (PEL + decoder + PAL) at TP=tp (+SP) vs the reference: losses and full gradients."""
    import dataclasses

    from tests.reference_evev1 import forward, make_batch, random_weights
    from tests.unit.test_evev1_model import SHAPE, _contract, _megatron_weights, config_of

    initialize_parallel(ParallelConfig(tp, 1, sequence_parallel=sequence_parallel), seed=1)
    shape = dataclasses.replace(SHAPE, image_size=224) if hd else SHAPE
    w = random_weights(shape, seed=7)
    model = EVEv1Model(config_of(shape, tensor_model_parallel_size=tp,
                                 sequence_parallel=sequence_parallel))
    load_full_state_dict(model, _megatron_weights(model, w))  # full weights, sliced per rank
    batch = make_batch(shape, [(2, 3), None, (4, 4), (1, 1)], rows=2, seq=64 if not hd else 96,
                       seed=2, hd=hd)
    ref_w = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    ref = forward(ref_w, batch, shape, hd=hd)
    per_token, pal_sum, n = model(**_contract(batch, shape), labels=batch["labels"],
                                  teacher_features=batch["teacher_feats"],
                                  teacher_valid=batch["teacher_valid"])
    ce = per_token.sum() / (batch["labels"] != -100).sum()
    (ce + pal_sum / n).backward()
    for p in model.parameters():  # what finalize_model_grads does for SP-replicated norms
        if getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
    ref["loss"].backward()
    ref_grads = _megatron_weights(model, {k: v.grad for k, v in ref_w.items()})
    grads = gather_full(model, grads=True)
    return {"ce": float(ce), "pal": float(pal_sum / n), "ref_ce": float(ref["ce"]),
            "ref_pal": float(ref["pal"]),
            "grad_err": max((float((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm()), k)
                            for k in ref_grads if not k.startswith("teacher."))}


class _GlobalNames:
    """A model chunk seen with global layer numbers (what the reference's name table maps)."""

    def __init__(self, chunk):
        from eve_megatron.models.eve.sharding import chunk_layer_offset, global_name

        offset = chunk_layer_offset(chunk)
        self.params = [(global_name(n, offset), p) for n, p in chunk.named_parameters()]

    def named_parameters(self):
        return iter(self.params)


def _pp_micro_batches(shape, hd):
    """Two micro-batches of 2 packed rows (images of several sizes, text-only samples)."""
    from tests.reference_evev1 import make_batch

    grids = ([(2, 3), None, (4, 4), (1, 1)], [(3, 2), None, (1, 1), (2, 2)])
    return [make_batch(shape, g, rows=2, seq=96 if hd else 64, seed=2 + i, hd=hd)
            for i, g in enumerate(grids)]


def _reference(w, batches, shape, hd):
    """The reference's losses and gradients over all micro-batches at once: CE per
    supervised token + PAL per image of the whole step."""
    from tests.reference_evev1 import forward

    ref_w = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    refs = [forward(ref_w, b, shape, hd=hd) for b in batches]
    tokens = [int((b["labels"] != -100).sum()) for b in batches]
    images = [len(b["images"]) for b in batches]
    ce = sum(r["ce"] * n for r, n in zip(refs, tokens)) / sum(tokens)
    pal = sum(r["pal"] * n for r, n in zip(refs, images)) / sum(images)
    (ce + pal).backward()
    return float(ce), float(pal), {k: v.grad for k, v in ref_w.items()}, sum(tokens) / sum(images)


def pp_step(layouts, hd: bool = False):
    """EVEv1 through Megatron's pipeline schedules at each (tp, pp, vp, sp) layout: the
    losses of two micro-batches and every gradient of this rank vs the reference."""
    import dataclasses
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from eve_megatron.training.model_setup import build_model_chunks, wrap_ddp
    from eve_megatron.training.step import loss_func
    from tests.reference_evev1 import random_weights
    from tests.unit.test_evev1_model import SHAPE, _contract, _megatron_weights, config_of

    shape = dataclasses.replace(SHAPE, image_size=224) if hd else SHAPE
    w = random_weights(shape, seed=7)
    batches = _pp_micro_batches(shape, hd)
    ref_ce, ref_pal, ref_grad, pal_weight = _reference(w, batches, shape, hd)
    micro = [dict(inputs=dict(_contract(b, shape), labels=b["labels"],
                              teacher_features=b["teacher_feats"],
                              teacher_valid=b["teacher_valid"]),
                  loss_mask=(b["labels"] != -100).float()) for b in batches]

    def step(data_iterator, model):
        b = next(data_iterator)
        return model(**b["inputs"]), partial(loss_func, b["loss_mask"], pal_weight=pal_weight)

    results = []
    for tp, pp, vp, sp in layouts:
        initialize_parallel(ParallelConfig(tp, pp, vp, sp), seed=1)
        cfg = config_of(shape, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                        virtual_pipeline_model_parallel_size=vp, sequence_parallel=sp,
                        pipeline_dtype=torch.float32)
        chunks = build_model_chunks(cfg)
        for chunk in chunks:
            load_full_state_dict(chunk, _megatron_weights(_GlobalNames(chunk), w))
        ddp = wrap_ddp(chunks, cfg)
        iters = [iter(micro) for _ in chunks] if vp else iter(micro)
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters,
            model=ddp if vp else ddp[0], num_microbatches=len(micro),
            seq_length=micro[0]["loss_mask"].shape[1] * chunks[0].carry_factor,
            micro_batch_size=micro[0]["loss_mask"].shape[0], forward_only=False)
        out = {"layout": (tp, pp, vp, sp), "carry_factor": chunks[0].carry_factor,
               "ref_ce": ref_ce, "ref_pal": ref_pal}
        if outputs:
            lm = sum(o["lm loss"] for o in outputs)
            pal = sum(o["pal loss"] for o in outputs)
            out.update(ce=float(lm[0] / lm[1]), pal=float(pal[0] / pal[1]))
        errs = []
        for chunk in chunks:
            grads = gather_full(chunk, grads=True)
            ref = _megatron_weights(_GlobalNames(chunk), ref_grad)
            errs += [(float((grads[k] - ref[k]).norm() / ref[k].norm()), k)
                     for k in ref if not k.startswith("teacher.")]
        out["grad_err"], out["n_grads"] = max(errs), len(errs)
        results.append(out)
    return results
