"""Damage never passes silently: flipped bytes in a dataset sample, a dataset index, a
checkpoint file or an export are found and named (file, sample index / tensor); the loader
stops or skips-and-counts by flag; exports verify tensor by tensor."""

import json
import os
import struct
import subprocess

import numpy as np
import pytest
import torch

from eve_megatron.checksums import SUMS, ChecksumError, check_folder, read_sums
from eve_megatron.data.dataset import EVEPackedDataset, PackedDataConfig
from eve_megatron.data.indexed import CorruptSampleError, IndexedDataset
from eve_megatron.data.loader import build_data_loader
from tests.training_data import write_train_dataset


def _flip(path: str, offset: int, n: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(n))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _sample_spans(ds: IndexedDataset, i: int):
    """(offset, nbytes) of sample i's token record and of each of its images in .bin."""
    off, n = int(ds.field("record_offset")[i]), int(ds.field("text_len")[i])
    start, end = int(ds.field("image_start")[i]), int(ds.field("image_start")[i + 1])
    return [(off, 5 * n)] + [(int(ds.field("image_offset")[j]), int(ds.field("image_nbytes")[j]))
                             for j in range(start, end)]


@pytest.fixture
def dataset(tmp_path):
    return write_train_dataset(str(tmp_path / "train"), n=20, seed=3)


def test_every_damaged_sample_is_named_by_file_and_index(dataset):
    clean = IndexedDataset(dataset)
    assert clean.has_checksums
    rng = np.random.default_rng(0)
    for i in range(len(clean)):
        for at, nbytes in _sample_spans(clean, i):
            offset = at + int(rng.integers(0, nbytes))
            _flip(dataset + ".bin", offset)
            ds = IndexedDataset(dataset)
            with pytest.raises(CorruptSampleError, match=rf"train\.bin: sample {i} is damaged"):
                ds.get(i)
            for j in (i - 1, i + 1):  # its neighbours still read
                if 0 <= j < len(ds):
                    ds.get(j)
            _flip(dataset + ".bin", offset)  # undo
    IndexedDataset(dataset).get(len(clean) - 1)


def test_a_truncated_bin_and_a_damaged_index_are_named(dataset):
    size = os.path.getsize(dataset + ".idx")
    for offset in (3, 20, 60, size // 2, size - 20, size - 3):  # magic, header, meta, arrays, crc
        _flip(dataset + ".idx", offset)
        with pytest.raises(ValueError, match=r"train\.idx: "):
            IndexedDataset(dataset)
        _flip(dataset + ".idx", offset)
    ds = IndexedDataset(dataset)
    last = len(ds) - 1
    os.truncate(dataset + ".bin", int(ds.field("record_offset")[last]) + 2)
    with pytest.raises(CorruptSampleError, match=f"sample {last} is damaged.*past the end"):
        IndexedDataset(dataset).get(last)


def test_version1_files_still_read_unverified(dataset):
    from eve_megatron.data.indexed import _read_index

    expected = IndexedDataset(dataset).get(5).tokens
    meta, a = _read_index(dataset + ".idx")
    n, m = len(a["text_len"]), len(a["image_h"])
    blob = json.dumps(meta, sort_keys=True).encode()
    out = [b"EVEMMIDX", struct.pack("<QQQQ", 1, n, m, len(blob)), blob,
           b"\0" * ((-(40 + len(blob))) % 8)]
    for name in ("record_offset", "text_len", "seq_len", "image_tokens", "image_start",
                 "image_offset", "image_nbytes", "image_h", "image_w", "image_pos"):
        raw = a[name].tobytes()
        out += [raw, b"\0" * ((-len(raw)) % 8)]
    with open(dataset + ".idx", "wb") as f:
        f.write(b"".join(out))
    with pytest.warns(UserWarning, match="version 1 has no checksums"):
        old = IndexedDataset(dataset)
    assert not old.has_checksums
    assert np.array_equal(old.get(5).tokens, expected)


def _packed(prefix, policy, rows=12):
    return EVEPackedDataset(PackedDataConfig([prefix], seq_length=64, num_samples=rows, seed=1,
                                             corrupt_samples=policy))


def test_loader_stops_or_skips_and_counts_a_damaged_sample(dataset):
    clean = [b for b in build_data_loader(_packed(dataset, "skip"), 0, 2, num_workers=0)]
    assert all(b["corrupt_samples"] == 0 for b in clean)
    packs = _packed(dataset, "stop")
    victim = int(packs.pack_samples(3)[1][0])  # first sample of row 3
    hit = [sum(victim in packs.pack_samples(g)[1] for g in (2 * k, 2 * k + 1))
           for k in range(len(clean))]  # rows of each micro-batch holding it (any epoch)
    _flip(dataset + ".bin", _sample_spans(IndexedDataset(dataset), victim)[0][0])
    with pytest.raises(CorruptSampleError, match=rf"train\.bin: sample {victim} is damaged"):
        list(build_data_loader(_packed(dataset, "stop"), 0, 2, num_workers=2))
    skipped = list(build_data_loader(_packed(dataset, "skip"), 0, 2, num_workers=2))
    assert [b["corrupt_samples"] for b in skipped] == hit and hit[1] >= 1
    for k in range(len(clean)):
        assert torch.equal(clean[k]["tokens"], skipped[k]["tokens"]) == (hit[k] == 0), k
    assert int(skipped[1]["loss_mask"][1].sum()) < int(clean[1]["loss_mask"][1].sum())


def _tiny_checkpoint(root):
    from eve_megatron.models.eve import EVEModel, eve_config
    from eve_megatron.training import checkpointing

    torch.manual_seed(0)
    model = EVEModel(eve_config("tiny"))
    checkpointing.save_checkpoint(root, 1, [model])
    return model, checkpointing.iteration_dir(root, 1)


def test_checkpoint_sums_find_any_flipped_bytes(megatron_world, tmp_path):
    from eve_megatron.models.eve import EVEModel, eve_config
    from eve_megatron.training import checkpointing

    root = str(tmp_path / "ckpt")
    _, folder = _tiny_checkpoint(root)
    sums = read_sums(folder)
    # every file is recorded: Megatron-Core's (shards, .metadata, metadata.json; 0.16 keeps
    # the common state in common.pt, 0.19 inside the shards) and ours
    assert set(sums) == set(os.listdir(folder)) - {SUMS}
    assert {".metadata", "metadata.json", "eve_model.json"} <= set(sums)
    assert any(n.endswith(".distcp") for n in sums)
    assert subprocess.run(["sha256sum", "--quiet", "-c", SUMS], cwd=folder).returncode == 0
    files = sorted(sums, key=lambda n: os.path.getsize(os.path.join(folder, n)))
    shard = files[-1]
    size = os.path.getsize(os.path.join(folder, shard))
    offsets = [(shard, int(x)) for x in np.linspace(0, size - 8, 12)] + \
        [(n, os.path.getsize(os.path.join(folder, n)) // 2) for n in files[:3]]
    for name, offset in offsets:  # 15 places, as the experiment
        _flip(os.path.join(folder, name), offset, 8)
        with pytest.raises(ChecksumError, match=rf"{name}: damaged"):
            checkpointing.load_checkpoint(root, [EVEModel(eve_config("tiny"))])
        _flip(os.path.join(folder, name), offset, 8)
    checkpointing.load_checkpoint(root, [EVEModel(eve_config("tiny"))])
    with open(os.path.join(folder, "stray.bin"), "wb") as f:
        f.write(b"x")
    with pytest.raises(ChecksumError, match="stray.bin: not recorded"):
        checkpointing.load_checkpoint(root, [EVEModel(eve_config("tiny"))])
    os.remove(os.path.join(folder, "stray.bin"))
    os.remove(os.path.join(folder, SUMS))  # a run killed before its record: loads, with a warning
    checkpointing.load_checkpoint(root, [EVEModel(eve_config("tiny"))])


def test_export_carries_sums_and_verify_compares_every_tensor(megatron_world, tmp_path):
    from eve_megatron.hf.export import export_checkpoint
    from eve_megatron.hf.hf_files import HFWeights

    root, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    _tiny_checkpoint(root)
    summary = export_checkpoint(root, out, progress=False, verify=True, dtype="bf16")
    assert summary["verified"] and summary["source_verified"]
    assert check_folder(out, "export", required=True)
    weights = HFWeights(out)
    shard = weights.files["model.embed_tokens.weight"]
    _flip(shard, os.path.getsize(shard) // 2, 8)
    with pytest.raises(ChecksumError, match=r"model\.safetensors: damaged"):
        check_folder(out, "export")
    _flip(shard, os.path.getsize(shard) // 2, 8)
    folder = os.path.join(root, "iter_0000001")
    biggest = max(read_sums(folder), key=lambda n: os.path.getsize(os.path.join(folder, n)))
    _flip(os.path.join(folder, biggest), 1000, 8)
    with pytest.raises(ChecksumError, match=f"{biggest}: damaged"):
        export_checkpoint(root, str(tmp_path / "hf2"), progress=False)
    assert not os.path.exists(tmp_path / "hf2")


def test_verify_export_names_a_tensor_that_differs(megatron_world, tmp_path):
    from eve_megatron.checksums import folder_files, hash_files, write_sums
    from eve_megatron.hf.dist_reader import DistCheckpointReader
    from eve_megatron.hf.export import export_checkpoint, plan, verify_export
    from eve_megatron.training import checkpointing

    root, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    _tiny_checkpoint(root)
    export_checkpoint(root, out, progress=False)
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(out, "model.safetensors"))
    tensors["model.norm.weight"][3] += 1  # a wrong value with a matching record
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    write_sums(out, hash_files(out, folder_files(out)))
    reader = DistCheckpointReader(checkpointing.iteration_dir(root, 1))
    fields = checkpointing.read_model_fields(root)
    names, planned = plan(reader, fields, None)
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' in model\.safetensors differs"):
        verify_export(out, reader, fields, names, {t.name: t.dtype for t in planned})


def test_sums_record_format_errors_are_named(tmp_path):
    (tmp_path / "a").write_text("x")
    (tmp_path / SUMS).write_text("nonsense\n")
    with pytest.raises(ChecksumError, match=f"{SUMS}: line 1"):
        check_folder(str(tmp_path))
    (tmp_path / SUMS).write_text(f"{'0' * 64}  a\n")
    with pytest.raises(ChecksumError, match="a: damaged"):
        check_folder(str(tmp_path))
    os.remove(tmp_path / "a")
    with pytest.raises(ChecksumError, match="a: missing"):
        check_folder(str(tmp_path))
