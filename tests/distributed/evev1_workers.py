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
