"""Single-process EVE model vs the plain PyTorch reference (fp32, rel. error <= 1e-5)."""

import pytest
import torch

from eve_megatron.models.eve import EVEModel, eve_config
from eve_megatron.models.eve.sharding import gather_full, load_full_state_dict
from tests.reference_eve import RefShape, make_batch, make_weights, model_batch, reference_step, rel_err, to_megatron

TOL = 1e-5


@pytest.mark.parametrize("decoupling", ["none", "mlp", "all"])
@pytest.mark.parametrize("tied", [False, True])
def test_matches_reference(megatron_world, decoupling, tied):
    shape = RefShape(decoupling=decoupling, tied=tied)
    weights = make_weights(shape, seed=21)
    model = EVEModel(eve_config("tiny", decoupling=decoupling,
                                share_embeddings_and_output_weights=tied))
    load_full_state_dict(model, to_megatron(weights, shape))
    batch = make_batch(shape, 2, 96, seed=4)
    ref_logits, ref_loss, ref_grads = reference_step(shape, weights, batch)
    mb = model_batch(batch)
    inputs = {k: v for k, v in mb.items() if k not in ("labels", "loss_mask")}
    assert rel_err(model(**inputs), ref_logits) <= TOL
    per_token = model(**inputs, labels=mb["labels"])
    assert rel_err(per_token, ref_loss) <= TOL
    (per_token.sum() / mb["loss_mask"].sum()).backward()
    grads = gather_full(model, grads=True)
    assert set(grads) == set(ref_grads)
    worst = max((rel_err(grads[k], ref_grads[k]), k) for k in ref_grads)
    assert worst[0] <= TOL, worst


def test_unpacked_rows_without_cu_seqlens(megatron_world):
    """Rows of one sample each: cu_seqlens may be omitted (plain causal attention)."""
    shape = RefShape()
    weights = make_weights(shape, seed=2)
    model = EVEModel(eve_config("tiny"))
    load_full_state_dict(model, to_megatron(weights, shape))
    batch = make_batch(shape, 2, 40, seed=9, packed=False)
    batch["segment_ids"] = torch.zeros_like(batch["segment_ids"])  # padding attends too
    ref_logits, _, _ = reference_step(shape, weights, batch)
    mb = model_batch(batch)
    logits = model(mb["tokens"], mb["position_ids"], mb["is_vision"],
                   pixel_values=mb["pixel_values"], image_grid_hw=mb["image_grid_hw"])
    assert rel_err(logits, ref_logits) <= TOL


def test_bad_batches_fail_clearly(megatron_world):
    shape = RefShape()
    model = EVEModel(eve_config("tiny"))
    mb = model_batch(make_batch(shape, 1, 64, seed=1))
    inputs = {k: v for k, v in mb.items() if k not in ("labels", "loss_mask")}
    flipped = inputs["is_vision"].clone()
    flipped[0, -1] = ~flipped[0, -1]
    with pytest.raises(ValueError, match="is_vision marks"):
        model(**{**inputs, "is_vision": flipped})
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(**{**inputs, "cu_seqlens": torch.tensor([0, 10], dtype=torch.int32)})
    with pytest.raises(ValueError, match="max_sequence_length"):
        model(**{**inputs, "position_ids": inputs["position_ids"] + 5000})
