"""Branch-order layout: one branch per token, both branches always in the graph, packing."""

import pytest
import torch

from eve_megatron.models.eve.routing import (
    Split,
    apply_branches,
    build_packed_seq_params,
    from_order,
    permute_rows,
    to_order,
)


def _linear(seed, d_in=8, d_out=5):
    torch.manual_seed(seed)
    return torch.nn.Linear(d_in, d_out)


def test_branches_equal_dense_blend():
    text, vision = _linear(0), _linear(1)
    x = torch.randn(6, 3, 8, requires_grad=True)  # [s, b, h]
    is_vision = torch.rand(3, 6) > 0.5  # [b, s]
    p = build_packed_seq_params(is_vision)
    branches = from_order(x.reshape(18, 8), p.br_from_seq, p.seq_from_br, p.n_text)
    out = to_order(apply_branches(branches, text, vision), p.seq_from_br, p.br_from_seq)
    out = out.view(6, 3, 5)
    m = is_vision.t().unsqueeze(-1).float()
    ref = text(x) * (1 - m) + vision(x) * m
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad((out * g).sum(), x)
    (gref,) = torch.autograd.grad((ref * g).sum(), x)
    torch.testing.assert_close(gx, gref, rtol=1e-6, atol=1e-6)


def test_branch_order_is_stable_text_then_vision():
    is_vision = torch.tensor([[0, 1, 0, 1, 1]], dtype=torch.bool)
    p = build_packed_seq_params(is_vision)
    assert p.br_from_seq.tolist() == [0, 2, 1, 3, 4]
    assert (p.n_text, p.n_vision) == (2, 3)
    assert torch.equal(p.br_from_seq[p.seq_from_local], torch.arange(5))
    x = torch.randn(5, 3, requires_grad=True)
    y = permute_rows(x, p.br_from_seq, p.seq_from_local)
    (g,) = torch.autograd.grad((y * torch.arange(15.0).view(5, 3)).sum(), x)
    assert torch.equal(g, torch.arange(15.0).view(5, 3)[p.seq_from_local])


@pytest.mark.parametrize("pad", [1, 16])
def test_empty_branch_still_gets_zero_gradient(pad):
    text, vision = _linear(0), _linear(1)
    x = torch.randn(8, 8, requires_grad=True)
    out = apply_branches(Split.of(x, 8), text, vision, pad_multiple=pad).join()
    out.square().sum().backward()
    assert vision.weight.grad is not None and torch.count_nonzero(vision.weight.grad) == 0
    assert torch.count_nonzero(text.weight.grad) > 0
    torch.testing.assert_close(out, text(x))


def test_sequence_parallel_layout():
    is_vision = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1], [1, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    seq = is_vision.t().reshape(-1)  # SEQ order flags
    full = build_packed_seq_params(is_vision)
    chunks = []
    for rank in range(2):
        p = build_packed_seq_params(is_vision, sequence_parallel_rank=rank, sequence_parallel_size=2)
        local = seq[rank * 8:(rank + 1) * 8]
        ordered = local[p.local_from_seq]
        assert not ordered[:p.local_n_text].any() and ordered[p.local_n_text:].all()
        assert torch.equal(p.br_from_seq, full.br_from_seq)
        chunks.append(p.local_from_seq + rank * 8)
    loc = torch.cat(chunks)  # LOC pos -> SEQ idx
    assert torch.equal(loc[p.br_from_loc], full.br_from_seq)
    assert sorted(p.br_from_loc.tolist()) == list(range(16))


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
