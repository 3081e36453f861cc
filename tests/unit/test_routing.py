"""Token routing: one branch per token, both branches always in the graph, packing metadata."""

import pytest
import torch

from eve_megatron.models.eve.routing import build_packed_seq_params, route


def _linear(seed, d_in=8, d_out=5):
    torch.manual_seed(seed)
    return torch.nn.Linear(d_in, d_out)


def test_route_equals_dense_blend():
    text, vision = _linear(0), _linear(1)
    x = torch.randn(6, 3, 8)  # [s, b, h]
    is_vision = torch.rand(3, 6) > 0.5  # [b, s]
    p = build_packed_seq_params(is_vision)
    out = route(x, text, vision, p.text_index, p.vision_index)
    m = is_vision.t().unsqueeze(-1).float()
    ref = text(x) * (1 - m) + vision(x) * m
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pad", [1, 16])
def test_empty_branch_still_gets_zero_gradient(pad):
    text, vision = _linear(0), _linear(1)
    x = torch.randn(4, 2, 8, requires_grad=True)
    p = build_packed_seq_params(torch.zeros(2, 4, dtype=torch.bool))
    out = route(x, text, vision, p.text_index, p.vision_index, pad_multiple=pad)
    out.square().sum().backward()
    assert vision.weight.grad is not None and torch.count_nonzero(vision.weight.grad) == 0
    assert torch.count_nonzero(text.weight.grad) > 0
    torch.testing.assert_close(out, text(x))


def test_sequence_parallel_local_indices():
    is_vision = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1], [1, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    full = build_packed_seq_params(is_vision)
    for rank in range(2):
        p = build_packed_seq_params(is_vision, sequence_parallel_rank=rank, sequence_parallel_size=2)
        local = is_vision.t()[rank * 4:(rank + 1) * 4].reshape(-1)
        assert torch.equal(p.local_vision_index, torch.nonzero(local).squeeze(1))
        assert torch.equal(p.vision_index, full.vision_index)


def test_segments_and_validation():
    is_vision = torch.zeros(2, 6, dtype=torch.bool)
    p = build_packed_seq_params(is_vision, torch.tensor([0, 2, 6, 9, 12], dtype=torch.int32))
    assert p.segment_ids.tolist() == [[0, 0, 1, 1, 1, 1], [2, 2, 2, 3, 3, 3]]
    assert p.max_seqlen_q == 4
    with pytest.raises(ValueError, match="crosses a row boundary"):
        build_packed_seq_params(is_vision, torch.tensor([0, 4, 8, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at b\\*s"):
        build_packed_seq_params(is_vision, torch.tensor([0, 6, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="divide by the TP size"):
        build_packed_seq_params(torch.zeros(1, 5, dtype=torch.bool), sequence_parallel_size=2)
