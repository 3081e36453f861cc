"""The packed Dataset and loader: batch contract vs an independent reference, workers, resume."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from eve_megatron.data.dataset import EVEPackedDataset, PackedDataConfig
from eve_megatron.data.images import CLIP_MEAN, CLIP_STD
from eve_megatron.data.indexed import IndexedDataset
from eve_megatron.data.loader import ResumableBatchSampler, build_data_loader, collate_rows
from tests.unit._data_helpers import write_random_dataset

SEQ = 64


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    write_random_dataset(str(d / "a"), 70, seed=1)
    write_random_dataset(str(d / "b"), 25, seed=2, image_prob=0.2)
    return str(d / "a"), str(d / "b")


def _dataset(prefixes, num_samples=120, blend=True, seed=5):
    path = ["0.7", prefixes[0], "0.3", prefixes[1]] if blend else [prefixes[0]]
    return EVEPackedDataset(PackedDataConfig(path, SEQ, num_samples, seed=seed, shuffle_window=16))


def _ref_blocks(data, hp, wp):
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64) / 255.0
    img = (img - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    out = []
    for by in range(hp):
        for bx in range(wp):
            block = img[by * 32:(by + 1) * 32, bx * 32:(bx + 1) * 32, :]  # y, x, c
            out.append(np.transpose(block, (2, 0, 1)).reshape(-1))
    return np.stack(out) if out else np.zeros((0, 3072))


def _ref_row(samples):
    tok, lab, vis, pos, seg, pix, grid = [], [], [], [], [], [], []
    for s in samples:
        seq, sup, v = [], [], []
        text = list(zip(s.tokens.tolist(), s.loss_mask.tolist()))
        cut = 0
        for im in s.images + [None]:
            end = len(text) if im is None else im.pos
            for t, m in text[cut:end]:
                seq.append(t), sup.append(m == 1), v.append(False)
            cut = end
            if im is not None:
                n = 1 + im.hp * (im.wp + 1)
                seq += [0] * n
                sup += [False] * n
                v += [True] * n
                pix.append(_ref_blocks(im.data, im.hp, im.wp))
                grid.append([im.hp, im.wp])
        tok += seq
        lab += [seq[t + 1] if sup[t + 1] else -100 for t in range(len(seq) - 1)] + [-100]
        vis += v
        pos += list(range(len(seq)))
        seg.append(len(seq))
    pad = SEQ - len(tok)
    if pad:
        tok += [0] * pad
        lab += [-100] * pad
        vis += [False] * pad
        pos += list(range(pad))
        seg.append(pad)
    return tok, lab, vis, pos, seg, pix, grid


def test_rows_match_independent_reference(prefixes):
    ds = _dataset(prefixes)
    datasets = [IndexedDataset(p) for p in prefixes]
    n_images = 0
    for g in range(0, len(ds), 7):
        d, ids = ds.pack_samples(g)
        row = ds[g]
        tok, lab, vis, pos, seg, pix, grid = _ref_row([datasets[d].get(int(i)) for i in ids])
        assert row["tokens"].tolist() == tok and row["labels"].tolist() == lab
        assert row["is_vision"].tolist() == vis and row["position_ids"].tolist() == pos
        assert row["seg_lens"].tolist() == seg and row["image_grid_hw"].tolist() == grid
        assert torch.equal(row["loss_mask"], (row["labels"] != -100).float())
        want = np.concatenate(pix) if pix else np.zeros((0, 3072))
        got = collate_rows([row])["pixel_values"]
        assert got.shape == want.shape and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-6)
        n_images += len(grid)
    assert n_images > 5  # the check above really compared pixels


def test_collate_contract(prefixes):
    ds = _dataset(prefixes)
    rows = [ds[g] for g in range(4)]
    b = collate_rows(rows)
    assert b["tokens"].shape == (4, SEQ) and b["tokens"].dtype == torch.int64
    assert b["loss_mask"].dtype == torch.float32 and b["is_vision"].dtype == torch.bool
    cu = b["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 4 * SEQ
    assert set(range(0, 4 * SEQ + 1, SEQ)) <= set(cu.tolist())  # every row start is a boundary
    assert b["max_seqlen"] == int(torch.diff(cu).max())
    hw = b["image_grid_hw"]
    assert int(b["is_vision"].sum()) == int((1 + hw[:, 0] * (hw[:, 1] + 1)).sum())
    assert b["pixel_values"].shape == (int((hw[:, 0] * hw[:, 1]).sum()), 3072)
    flat_pos = b["position_ids"].reshape(-1)
    assert (flat_pos[cu[:-1].long()] == 0).all()  # positions restart at every segment


def test_each_sample_once_per_epoch_in_stream(prefixes):
    ds = _dataset(prefixes, num_samples=400)
    stream = ds.streams[1]
    lengths = ds.datasets[1].seq_lengths
    for e, index in enumerate(stream.epochs[:3]):
        assert np.array_equal(np.sort(index.samples), np.arange(len(lengths)))
        assert index.pack_lengths(lengths).max() <= SEQ
    counts = np.bincount(ds.dataset_index, minlength=2)
    assert abs(counts[0] / 400 - 0.7) < 0.01


def test_workers_give_identical_batches(prefixes):
    ds = _dataset(prefixes, num_samples=24)
    serial = list(build_data_loader(ds, 0, 3, num_workers=0))
    parallel = list(build_data_loader(ds, 0, 3, num_workers=2))
    assert len(serial) == len(parallel) == 8
    for a, b in zip(serial, parallel):
        for k in a:
            assert (a[k] == b[k]) if isinstance(a[k], int) else torch.equal(a[k], b[k])


def _global_rows(total, consumed, mbs, dp):
    """The order in which rows are consumed over all ranks, step by step."""
    per_rank = [list(ResumableBatchSampler(total, consumed, mbs, r, dp)) for r in range(dp)]
    return [i for step in zip(*per_rank) for batch in step for i in batch]


def test_resume_at_any_count_with_any_dp_continues_exactly():
    total = 240
    full = _global_rows(total, 0, 1, 1)
    assert full == list(range(total))
    rng = np.random.default_rng(0)
    for case in range(60):
        mbs1, dp1, mbs2, dp2 = (int(x) for x in rng.integers(1, 5, 4))
        first = _global_rows(total, 0, mbs1, dp1)
        if case % 2:  # any count at all, not only a step boundary of the first run
            consumed = int(rng.integers(0, total + 1))
        else:
            consumed = min(len(first), int(rng.integers(0, 120)) * mbs1 * dp1)
        resumed = _global_rows(total, consumed, mbs2, dp2)
        assert full[:consumed] + resumed == full[:consumed + len(resumed)]
        assert first[:min(consumed, len(first))] == full[:min(consumed, len(first))]
        assert total - consumed - len(resumed) < mbs2 * dp2  # only a final partial step is dropped


def test_resumed_loader_yields_the_same_rows(prefixes):
    ds = _dataset(prefixes, num_samples=30)
    ref = [ds[g]["tokens"] for g in range(30)]
    rank_batches = [list(build_data_loader(ds, 9, 2, r, 3, num_workers=0)) for r in range(3)]
    got = [t for step in zip(*rank_batches) for b in step for t in b["tokens"]]
    assert len(got) == 18 and all(torch.equal(a, b) for a, b in zip(got, ref[9:27]))


def test_errors_are_clear(prefixes):
    with pytest.raises(ValueError, match="seq_length 8"):
        EVEPackedDataset(PackedDataConfig([prefixes[0]], 8, 10))
    with pytest.raises(ValueError, match="consumed_samples"):
        ResumableBatchSampler(10, 11, 1, 0, 1)
    with pytest.raises(IndexError):
        _dataset(prefixes, num_samples=5)[5]
