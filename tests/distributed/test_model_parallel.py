"""The Megatron EVE model equals the plain PyTorch reference under every parallel layout.

fp32, relative error <= 1e-5 for logits, the global mean loss and every gradient, on
packed micro-batches mixing images of several aspect ratios and text-only samples.
Layouts: (tensor, pipeline, sequence-parallel, virtual pipeline, micro-batch size).
"""

import pytest

from eve_megatron.launch import run_distributed
from tests.distributed.model_workers import global_rows
from tests.reference_eve import RefShape, collate_rows, make_weights, reference_step, rel_err

TOL = 1e-5
LAYOUTS = [
    (1, 1, False, None, 1),  # DP=4
    (2, 1, False, None, 1),  # TP=2, DP=2
    (2, 1, True, None, 1),  # TP=2 + SP
    (1, 2, False, None, 1),  # PP=2, DP=2
    (2, 2, False, None, 2),  # TP2 x PP2, 2 micro-batches
    (2, 2, True, None, 2),  # TP2 x PP2 + SP
    (1, 2, False, 2, 1),  # PP=2 interleaved (2 virtual stages)
]
TIED_LAYOUTS = [(2, 2, True, None, 2), (1, 2, False, 2, 1)]
FLEX_LAYOUTS = [(2, 1, False, None, 1), (1, 2, False, None, 1), (2, 2, True, None, 2)]
"""The flex attention backend under TP2 (DP2), PP2 (DP2) and TP2 x PP2 + SP."""


def _reference(shape):
    batch = collate_rows(global_rows(shape, 4))
    return reference_step(shape, make_weights(shape, seed=7), batch)


def _check(results, reference, layout):
    ref_logits, ref_per_token, ref_grads = reference
    mine = [r for r in results if r["layout"] == layout]
    last = sorted((r for r in mine if "logits" in r and r["tp_rank"] == 0),
                  key=lambda r: r["dp_rank"])
    logits = __import__("torch").cat([r["logits"] for r in last])
    assert rel_err(logits, ref_logits) <= TOL
    loss_sum, count = last[0]["loss"].tolist()
    ref_mean = float(ref_per_token.sum()) / float((ref_per_token != 0).sum())
    assert count == float((ref_per_token != 0).sum())
    assert abs(loss_sum / count - ref_mean) / ref_mean <= TOL
    grads = {}
    for r in mine:
        grads.update(r.get("grads", {}))
    missing = set(ref_grads) - set(grads)
    assert not missing, f"no gradient for {sorted(missing)}"
    worst = max((rel_err(grads[k], ref_grads[k]), k) for k in ref_grads)
    assert worst[0] <= TOL, worst


@pytest.fixture(scope="module")
def untied_results():
    per_rank = run_distributed("tests.distributed.model_workers:layout_equivalence", 4,
                               layouts=LAYOUTS, decoupling="all", tied=False)
    return [r for rank in per_rank for r in rank]


@pytest.fixture(scope="module")
def tied_mlp_results():
    per_rank = run_distributed("tests.distributed.model_workers:layout_equivalence", 4,
                               layouts=TIED_LAYOUTS, decoupling="mlp", tied=True)
    return [r for rank in per_rank for r in rank]


@pytest.fixture(scope="module")
def flex_results():
    per_rank = run_distributed("tests.distributed.model_workers:layout_equivalence", 4,
                               layouts=FLEX_LAYOUTS, decoupling="all", attention="flex")
    return [r for rank in per_rank for r in rank]


@pytest.mark.parametrize("layout", FLEX_LAYOUTS, ids=[str(x) for x in FLEX_LAYOUTS])
def test_flex_backend_matches_reference(flex_results, layout):
    _check(flex_results, _reference(RefShape(decoupling="all")), layout)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[str(x) for x in LAYOUTS])
def test_eve_v2_matches_reference(untied_results, layout):
    _check(untied_results, _reference(RefShape(decoupling="all")), layout)


@pytest.mark.parametrize("layout", TIED_LAYOUTS, ids=[str(x) for x in TIED_LAYOUTS])
def test_tied_mlp_decoupled_matches_reference(tied_mlp_results, layout):
    _check(tied_mlp_results, _reference(RefShape(decoupling="mlp", tied=True)), layout)
