"""EVEv1's PAL under pipeline parallelism, the pieces: which taps travel in the carry (and so
the carry factor) at the released sizes and several layouts, the carry's layout and its
gradient path, and the refusal of a full-recompute unit that would hide a tap. The
end-to-end checks (PP2, PP2 x VP2, PP2 x TP2 + SP against the reference; the trainer at PP2
against PP1) are in tests/distributed/test_evev1_parallel.py and
tests/functional/test_evev1_training.py."""

import pytest
import torch

from eve_megatron.models.evev1 import EVEv1Model, evev1_config
from eve_megatron.models.evev1.pipeline import (
    carried_taps,
    carry_factor,
    last_chunk_offset,
    make_carry,
    split_carry,
)


@pytest.mark.parametrize("preset,pp,vp,last,taps", [
    ("evev1-7b", 1, None, 0, []),
    ("evev1-7b", 2, None, 16, [0, 4, 8, 12]),        # hs[16] is the last stage's input
    ("evev1-7b", 4, None, 24, [0, 4, 8, 12, 16, 20]),
    ("evev1-7b", 2, 2, 24, [0, 4, 8, 12, 16, 20]),   # chunks of 8 layers: last = 25..32
    ("evev1-7b", 8, None, 28, [0, 4, 8, 12, 16, 20, 24]),
    ("evev1-tiny", 2, None, 2, [0, 1]),
    ("evev1-tiny", 2, 2, 3, [0, 1, 2]),
])
def test_carried_taps(preset, pp, vp, last, taps):
    cfg = evev1_config(preset, pipeline_model_parallel_size=pp,
                       virtual_pipeline_model_parallel_size=vp, pipeline_dtype=torch.float32)
    assert last_chunk_offset(cfg) == last
    assert carried_taps(cfg) == taps and carry_factor(cfg) == 1 + len(taps)


def test_carry_layout_and_gradients():
    hidden, received, computed = (torch.randn(3, 2, 4, requires_grad=True) for _ in range(3))
    carry = make_carry(hidden, [0, 1, 2], {1: computed}, {0: received})
    assert carry.shape == (12, 2, 4)
    assert torch.equal(carry[:3], hidden) and torch.equal(carry[3:6], received)
    assert torch.equal(carry[6:9], computed) and not carry[9:].any()  # tap 2: not yet computed
    carry.backward(torch.arange(12.).view(12, 1, 1).expand(12, 2, 4))
    assert float(hidden.grad.sum()) == 8 * 3 and float(received.grad.sum()) == 8 * 12
    assert float(computed.grad.sum()) == 8 * 21

    inbound = torch.randn(12, 2, 4, requires_grad=True)
    part, slots = split_carry(inbound, [0, 1, 2])
    assert torch.equal(part, inbound[:3]) and list(slots) == [0, 1, 2]
    assert torch.equal(slots[2], inbound[9:])
    (part.sum() + 2 * slots[1].sum()).backward()  # slot gradients reach the received carry
    expected = torch.tensor([1.] * 3 + [0.] * 3 + [2.] * 3 + [0.] * 3)
    assert torch.equal(inbound.grad[:, 0, 0], expected)


@pytest.mark.parametrize("method,layers,ok", [("uniform", 1, True), ("uniform", 2, False),
                                               ("block", 2, True)])
def test_a_recompute_unit_may_not_hide_a_tap(megatron_world, method, layers, ok):
    cfg = evev1_config("evev1-tiny", recompute_granularity="full", recompute_method=method,
                       recompute_num_layers=layers)
    if ok:
        EVEv1Model(cfg)
    else:
        with pytest.raises(ValueError, match=r"hides the PAL taps \[3, 1\]"):
            EVEv1Model(cfg)
