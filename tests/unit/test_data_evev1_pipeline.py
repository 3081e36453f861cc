"""EVEv1 data end to end: preprocessing (--model-family evev1) -> indexed dataset version 3
-> loader batch with 28-pixel blocks and the teacher fields of the batch contract."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from eve_megatron.data.dataset import EVEPackedDataset, PackedDataConfig
from eve_megatron.data.images import CLIP_MEAN, CLIP_STD, ImageConfig
from eve_megatron.data.indexed import CorruptSampleError, IndexedDataset
from eve_megatron.data.loader import build_data_loader
from eve_megatron.data.preflight import PreflightError
from eve_megatron.data.preprocess import PreprocessConfig, run_preprocess
from eve_megatron.hf import evev1_image_rules as rules
from eve_megatron.tools.preprocess_data import main as preprocess_main
from tests.unit._data_helpers import make_llama_sp_tokenizer, random_rgb

SIZES = {"wide.png": (1000, 333), "small.png": (50, 40)}
GRIDS = {(8, 24): "wide.png", (20, 24): "small.png"}  # hand-computed, ratio 2


def _inputs(tmp_path):
    for name, (w, h) in SIZES.items():
        Image.fromarray(random_rgb(w, h, w)).save(tmp_path / name)
    records = [{"id": "wide", "image": "wide.png", "conversations": [
                    {"from": "human", "value": "What is it?\n<image>"},
                    {"from": "gpt", "value": "A red cat."}]},
               {"id": "small", "image": "small.png", "conversations": [
                    {"from": "human", "value": "<image>\nDescribe."},
                    {"from": "gpt", "value": "Two dogs."}]},
               {"id": "text", "conversations": [{"from": "human", "value": "Hi?"},
                                                {"from": "gpt", "value": "Hello."}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return str(tmp_path / "data.json")


@pytest.fixture(scope="module")
def evev1_prefix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evev1_data")
    cfg = PreprocessConfig(inputs=[_inputs(tmp)], output_prefix=str(tmp / "ds"),
                           tokenizer=make_llama_sp_tokenizer(str(tmp / "tok")),
                           template="vicuna_v1", model_family="evev1", evev1_ratio=2,
                           image_root=str(tmp), seq_length=1024, workers=0, progress=False,
                           image=ImageConfig(encode_format="png"))
    summary = run_preprocess(cfg)
    assert summary["written"] == 3 and not summary["failed"], summary
    return str(tmp / "ds"), tmp


def _normalised(rgb: np.ndarray) -> np.ndarray:
    """Independent CLIP normalisation of ``[H, W, 3]`` uint8 -> ``[3, H, W]``."""
    x = rgb.astype(np.float64).transpose(2, 0, 1) / 255.0
    return (x - np.array(CLIP_MEAN)[:, None, None]) / np.array(CLIP_STD)[:, None, None]


def test_dataset_is_version_3_with_28_pixel_blocks(evev1_prefix):
    prefix, _ = evev1_prefix
    with open(prefix + ".idx", "rb") as f:
        assert struct.unpack("<Q", f.read(16)[8:])[0] == 3
    ds = IndexedDataset(prefix)
    assert ds.block == 28 and ds.has_teacher and ds.metadata["model_family"] == "evev1"
    assert ds.metadata["image"]["evev1_ratio"] == 2
    assert sorted(zip(ds.field("image_h"), ds.field("image_w"))) == [(8, 24), (20, 24)]
    assert sorted(zip(ds.field("teacher_w"), ds.field("teacher_h"))) == [(336, 112), (336, 280)]
    starts = ds.field("image_start")
    text = [i for i in range(len(ds)) if starts[i] == starts[i + 1]]
    assert len(text) == 1 and ds.field("image_tokens")[text[0]] == 0  # text-only: no image tokens
    assert ds.get(text[0]).tokens[0] == 1  # BOS first


def test_loader_batch_satisfies_the_contract(evev1_prefix):
    prefix, tmp = evev1_prefix
    dataset = EVEPackedDataset(PackedDataConfig([prefix], seq_length=1024, num_samples=2))
    assert dataset.block == 28 and dataset.teacher
    (batch,) = list(build_data_loader(dataset, 0, 2, num_workers=0))
    grid = batch["image_grid_hw"]
    n_img, tokens = grid.shape[0], 1 + grid[:, 0] * (grid[:, 1] + 1)
    assert n_img == 4 and int(batch["is_vision"].sum()) == int(tokens.sum())
    assert batch["pixel_values"].shape == (int((grid[:, 0] * grid[:, 1]).sum()), 3 * 28 * 28)
    assert batch["teacher_pixel_values"].shape == (n_img, 3, 336, 336)
    assert batch["teacher_pixel_values"].dtype == torch.float32
    assert batch["teacher_valid"].shape == (n_img, 576)
    assert batch["teacher_valid"].dtype == torch.bool
    # the image spans in stream order have the grid's token counts
    runs = [len(r) for row in batch["is_vision"] for r in
            np.split(np.arange(len(row)), np.flatnonzero(np.diff(row.numpy().astype(int))) + 1)
            if row[r[0]]]
    assert runs == tokens.tolist()
    at = 0
    for i, (h, w) in enumerate(grid.tolist()):
        original = Image.open(tmp / GRIDS[(h, w)])
        student = np.asarray(original.resize((w * 28, h * 28), Image.BICUBIC))
        blocks = batch["pixel_values"][at:at + h * w].view(h, w, 3, 28, 28)
        want = _normalised(student).reshape(3, h, 28, w, 28).transpose(1, 3, 0, 2, 4)
        assert np.allclose(blocks.numpy(), want, atol=1e-5)
        at += h * w
        base = rules.base_size(*original.size)
        canvas = rules.teacher_canvas(np.asarray(original.resize(base, Image.BICUBIC)))
        assert np.allclose(batch["teacher_pixel_values"][i].numpy(), _normalised(canvas), atol=1e-5)
        assert int(batch["teacher_valid"][i].sum()) == base[1] // 14 * 24
        assert (batch["teacher_valid"][i] == torch.from_numpy(rules.teacher_valid(*base))).all()
        valid = batch["teacher_valid"][i].view(24, 24)  # x2: one teacher patch per 28-px block
        assert (int(valid.any(1).sum()), int(valid.any(0).sum())) == (h, w)


def test_worker_batches_equal_in_process_ones(evev1_prefix):
    """Teacher tensors built in shared memory by DataLoader workers arrive intact."""
    dataset = EVEPackedDataset(PackedDataConfig([evev1_prefix[0]], seq_length=1024, num_samples=2))
    serial = list(build_data_loader(dataset, 0, 1, num_workers=0))
    workers = list(build_data_loader(dataset, 0, 1, num_workers=2))
    for a, b in zip(serial, workers, strict=True):
        for key in ("pixel_values", "teacher_pixel_values", "teacher_valid", "image_grid_hw"):
            assert torch.equal(a[key], b[key]), key


def test_batch_drives_the_evev1_patch_embedding(evev1_prefix):
    from eve_megatron.models.evev1 import EVEv1PatchEmbedding, evev1_config

    dataset = EVEPackedDataset(PackedDataConfig([evev1_prefix[0]], seq_length=1024, num_samples=1))
    batch = next(iter(build_data_loader(dataset, 0, 1, num_workers=0)))
    pel = EVEv1PatchEmbedding(evev1_config("evev1-tiny"))
    out = pel(batch["pixel_values"], batch["image_grid_hw"])
    assert out.shape[0] == int(batch["is_vision"].sum())


def test_teacher_bytes_are_checksummed(evev1_prefix, tmp_path):
    prefix, _ = evev1_prefix
    ds = IndexedDataset(prefix)
    data = bytearray(open(prefix + ".bin", "rb").read())
    data[int(ds.field("teacher_offset")[0]) + 100] ^= 0x40
    (tmp_path / "bad.bin").write_bytes(bytes(data))
    (tmp_path / "bad.idx").write_bytes(open(prefix + ".idx", "rb").read())
    bad = IndexedDataset(str(tmp_path / "bad"))
    owner = int(np.searchsorted(bad.field("image_start"), 0, side="right")) - 1
    with pytest.raises(CorruptSampleError, match=f"sample {owner} is damaged"):
        bad.get(owner)


def test_family_and_template_must_agree(tmp_path):
    cfg = PreprocessConfig(inputs=[_inputs(tmp_path)], output_prefix=str(tmp_path / "o"),
                           tokenizer=make_llama_sp_tokenizer(str(tmp_path / "tok")),
                           template="qwen2", model_family="evev1", evev1_ratio=3,
                           image_root=str(tmp_path), seq_length=64, progress=False)
    with pytest.raises(PreflightError) as err:
        run_preprocess(cfg)
    assert "--template qwen2 is evev2's" in str(err.value) and "--evev1-ratio" in str(err.value)


def test_cli_evev1_and_evev2_unchanged(tmp_path):
    tok = make_llama_sp_tokenizer(str(tmp_path / "tok"))
    common = ["--input", _inputs(tmp_path), "--image-root", str(tmp_path), "--tokenizer", tok,
              "--seq-length", "2048", "--workers", "0", "--no-progress"]
    assert preprocess_main(common + ["--model-family", "evev1", "--evev1-ratio", "4",
                                     "--output-prefix", str(tmp_path / "v1")]) == 0
    v1 = IndexedDataset(str(tmp_path / "v1"))
    assert v1.metadata["template"] == "plain_bos" and v1.has_teacher
    assert sorted(zip(v1.field("image_h"), v1.field("image_w"))) == [(16, 48), (40, 48)]
    assert preprocess_main(common + ["--output-prefix", str(tmp_path / "v2")]) == 0
    with open(str(tmp_path / "v2.idx"), "rb") as f:
        assert struct.unpack("<Q", f.read(16)[8:])[0] == 2  # EVEv2: version 2 as before
    v2 = EVEPackedDataset(PackedDataConfig([str(tmp_path / "v2")], seq_length=2048, num_samples=1))
    assert v2.block == 32 and not v2.teacher and "model_family" not in v2.datasets[0].metadata
    batch = next(iter(build_data_loader(v2, 0, 1, num_workers=0)))
    assert "teacher_pixel_values" not in batch and batch["pixel_values"].shape[1] == 3 * 32 * 32
