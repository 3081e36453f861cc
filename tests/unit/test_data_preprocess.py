"""End-to-end preprocessing: every input kind, every bad-input kind, atomic output."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from eve_megatron.data import preprocess as pp
from eve_megatron.data.images import ImageConfig, anyratio_size, decode_rgb
from eve_megatron.data.indexed import IndexedDataset
from eve_megatron.data.templates import QWEN2_SYSTEM
from eve_megatron.data.tokenizer import load_tokenizer
from tests.unit._data_helpers import encode, make_hf_tokenizer, random_rgb
from tests.unit.test_data_images import _png_header_only

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(REPO, "tools", "preprocess", "preprocess_data.py")


def _images(root):
    """Odd images on disk; returns {name: upright (W, H)}."""
    os.makedirs(root)
    sizes = {}
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(random_rgb(96, 40, 1)).save(f"{root}/exif.jpg", exif=exif.tobytes())
    sizes["exif.jpg"] = (40, 96)
    Image.new("CMYK", (70, 50), (10, 200, 30, 5)).save(f"{root}/cmyk.jpg")
    sizes["cmyk.jpg"] = (70, 50)
    Image.fromarray(np.random.default_rng(0).integers(0, 65535, (64, 80), dtype=np.uint16)).save(
        f"{root}/gray16.png")
    sizes["gray16.png"] = (80, 64)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 33, 4), dtype=np.uint8)).save(
        f"{root}/rgba.png")
    sizes["rgba.png"] = (33, 45)
    Image.fromarray(random_rgb(60, 40, 2)).convert("P").save(f"{root}/pal.gif")
    sizes["pal.gif"] = (60, 40)
    Image.fromarray(random_rgb(20, 50, 3)).save(f"{root}/tiny.png")
    sizes["tiny.png"] = (20, 50)
    Image.fromarray(random_rgb(4000, 300, 4)).save(f"{root}/wide.png")
    sizes["wide.png"] = (4000, 300)
    good = encode(Image.fromarray(random_rgb(64, 64, 5)), "JPEG")
    open(f"{root}/truncated.jpg", "wb").write(good[:len(good) // 2])
    open(f"{root}/junk.png", "wb").write(os.urandom(300))
    open(f"{root}/bomb.png", "wb").write(_png_header_only(60000, 60000))
    return sizes


def _conv(q, a="A thing."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    sizes = _images(str(d / "img"))
    good = [{"id": f"ok-{n}", "image": n, "conversations": _conv(f"Describe {n}.\n<image>")}
            for n in sizes]
    bad = [
        {"id": "text-only", "conversations": _conv("Say hi.", "Hi.")},
        {"id": "missing-file", "image": "nope.jpg", "conversations": _conv("<image>")},
        {"id": "truncated", "image": "truncated.jpg", "conversations": _conv("<image>")},
        {"id": "junk", "image": "junk.png", "conversations": _conv("<image>")},
        {"id": "bomb", "image": "bomb.png", "conversations": _conv("<image>")},
        {"id": "empty", "image": "tiny.png", "conversations": []},
        {"id": "no-fields", "image": "tiny.png"},
        {"id": "two-markers", "image": "tiny.png", "conversations": _conv("<image><image>")},
        {"id": "gpt-first", "conversations": [{"from": "gpt", "value": "x"}]},
        {"id": "too-long", "image": "tiny.png", "conversations": _conv("<image>", "word " * 3000)},
    ]
    with open(d / "llava.json", "w") as f:
        json.dump(good + bad, f)
    with open(d / "caps.jsonl", "w") as f:
        f.write(json.dumps({"image": "pal.gif", "caption": "a palette picture"}) + "\n")
        f.write("{this is not json\n")
        f.write(json.dumps({"caption": "no image here"}) + "\n")
        f.write(json.dumps({"text": "plain text document about cats"}) + "\n")
    with tarfile.open(d / "shard.tar", "w") as tar:
        members = {"k0.jpg": encode(Image.fromarray(random_rgb(100, 60, 6)), "JPEG"),
                   "k0.txt": b"a tar caption", "k1.txt": b"caption without image",
                   "k2.png": encode(Image.fromarray(random_rgb(30, 30, 7)), "PNG")}
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tok = make_hf_tokenizer(str(d / "tok"))
    return {"dir": d, "sizes": sizes, "tok": tok,
            "files": [str(d / "llava.json"), str(d / "caps.jsonl"), str(d / "shard.tar")]}


EXPECTED_SKIPS = {"missing_image": 2, "bad_image": 2, "decompression_bomb": 1,
                  "empty_conversation": 1, "missing_field": 3, "image_count_mismatch": 1,
                  "bad_conversation": 1, "too_long": 1, "bad_json": 1}


def _cli(inputs, prefix, *extra):
    cmd = [sys.executable, CLI, "--input", *inputs["files"], "--image-root",
           str(inputs["dir"] / "img"), "--tokenizer", inputs["tok"], "--template", "qwen2",
           "--max-image-size", "800", "--seq-length", "1200", "--output-prefix", prefix,
           "--workers", "2", "--image-format", "png", "--max-bad-fraction", "0.6", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(inputs, tmp_path):
    prefix = str(tmp_path / "out" / "ds")
    res = _cli(inputs, prefix)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    n_good = len(inputs["sizes"]) + 4  # the odd images, text-only conv, caption, text, tar k0
    assert summary["skipped_by_reason"] == EXPECTED_SKIPS
    assert summary["written"] == n_good and summary["skipped"] == sum(EXPECTED_SKIPS.values())
    report = [json.loads(line) for line in open(prefix + ".skipped.jsonl")]
    by_id = {r["id"]: r["reason"] for r in report}
    assert by_id["bomb"] == "decompression_bomb" and by_id["too-long"] == "too_long"
    assert by_id["caps.jsonl:2"] == "bad_json" and by_id["k1"] == "missing_image"
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]
    _check_dataset(IndexedDataset(prefix), inputs)


def _check_dataset(ds, inputs):
    tok = load_tokenizer(inputs["tok"])
    for i, name in enumerate(inputs["sizes"]):  # the good LLaVA samples, in input order
        s = ds.get(i)
        (im,) = s.images
        w, h = anyratio_size(*inputs["sizes"][name], 800)
        assert (im.wp * 32, im.hp * 32) == (w, h) and decode_rgb(im.data).shape == (h, w, 3)
        assert tok.decode(s.tokens[:im.pos].tolist()) == f"{QWEN2_SYSTEM} USER: "
        assert tok.decode(s.tokens[im.pos:].tolist()) == \
            f"\nDescribe {name}. ASSISTANT: A thing.<|im_end|>"
        assert tok.decode(s.tokens[s.loss_mask == 1].tolist()) == " A thing.<|im_end|>"
        assert ds.field("image_tokens")[i] == 1 + im.hp * (im.wp + 1)
        assert ds.seq_lengths[i] == len(s.tokens) + 1 + im.hp * (im.wp + 1)
    wide = ds.get(list(inputs["sizes"]).index("wide.png")).images[0]
    assert (wide.hp, wide.wp, wide.num_tokens) == (7, 91, 645)
    text_only = ds.get(len(inputs["sizes"]))
    assert text_only.images == [] and tok.decode(text_only.tokens[text_only.loss_mask == 1].tolist()) \
        == " Hi.<|im_end|>"
    last = ds.get(len(ds) - 1)  # tar k0 (k1, k2 are skipped)
    assert tok.decode(last.tokens.tolist()).endswith(" ASSISTANT: a tar caption<|im_end|>")
    assert (last.images[0].wp, last.images[0].hp) == (3, 2)


def test_worker_count_does_not_change_output(inputs, tmp_path):
    prefix = str(tmp_path / "w")
    assert _cli(inputs, prefix + "2").returncode == 0
    cfg = pp.PreprocessConfig(inputs=inputs["files"], output_prefix=prefix + "0",
                              tokenizer=inputs["tok"], template="qwen2",
                              image_root=str(inputs["dir"] / "img"), seq_length=1200,
                              image=ImageConfig(max_size=800, encode_format="png"), workers=0,
                              max_bad_fraction=0.6, progress=False)
    assert pp.run_preprocess(cfg)["written"] > 0
    for suffix in (".bin", ".skipped.jsonl"):
        assert open(prefix + "0" + suffix, "rb").read() == open(prefix + "2" + suffix, "rb").read()
    a, b = IndexedDataset(prefix + "0"), IndexedDataset(prefix + "2")
    assert (a.seq_lengths == b.seq_lengths).all()


def test_truncate_flag_keeps_long_sample(inputs, tmp_path):
    res = _cli(inputs, str(tmp_path / "t"), "--truncate")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert res.returncode == 0 and summary["truncated"] == 1 and "too_long" not in \
        summary["skipped_by_reason"]
    ds = IndexedDataset(str(tmp_path / "t"))
    assert ds.seq_lengths.max() == 1200


def test_bad_fraction_fails_without_dataset(inputs, tmp_path):
    prefix = str(tmp_path / "f")
    res = _cli(inputs, prefix, "--max-bad-fraction", "0.1")
    assert res.returncode == 1 and json.loads(res.stdout.strip())["failed"]
    assert sorted(os.listdir(tmp_path)) == ["f.skipped.jsonl"]


def test_interrupted_run_leaves_nothing_under_final_name(inputs, tmp_path, monkeypatch):
    real = pp.read_inputs

    def dying(paths):
        for k, raw in enumerate(real(paths)):
            if k == 5:
                raise KeyboardInterrupt
            yield raw

    monkeypatch.setattr(pp, "read_inputs", dying)
    cfg = pp.PreprocessConfig(inputs=inputs["files"], output_prefix=str(tmp_path / "x"),
                              tokenizer=inputs["tok"], image_root=str(inputs["dir"] / "img"),
                              workers=0, batch_size=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        pp.run_preprocess(cfg)
    assert os.listdir(tmp_path) == []


def test_config_errors_are_clear(inputs, tmp_path):
    base = dict(inputs=inputs["files"], output_prefix=str(tmp_path / "e"), tokenizer=inputs["tok"])
    with pytest.raises(ValueError, match="--template"):
        pp.PreprocessConfig(**base, template="llama").validate()
    with pytest.raises(ValueError, match="neither"):
        pp.run_preprocess(pp.PreprocessConfig(**{**base, "tokenizer": str(tmp_path / "no.txt")}))


def test_preprocessed_output_feeds_the_loader(inputs, tmp_path):
    from eve_megatron.data.dataset import EVEPackedDataset, PackedDataConfig
    from eve_megatron.data.loader import build_data_loader

    prefix = str(tmp_path / "e2e")
    assert _cli(inputs, prefix).returncode == 0
    n = len(IndexedDataset(prefix))
    ds = EVEPackedDataset(PackedDataConfig([prefix], 1200, num_samples=16, seed=3))
    seen = []
    for batch in build_data_loader(ds, 0, 2, num_workers=0):
        hw = batch["image_grid_hw"]
        assert int(batch["is_vision"].sum()) == int((1 + hw[:, 0] * (hw[:, 1] + 1)).sum())
        assert batch["pixel_values"].shape == (int((hw[:, 0] * hw[:, 1]).sum()), 3072)
        assert batch["cu_seqlens"][-1] == 2 * 1200 and batch["loss_mask"].sum() > 0
    for g in range(len(ds)):
        seen += ds.pack_samples(g)[1].tolist()
    assert len(seen) >= n and sorted(seen[:n]) == list(range(n))  # epoch 0: each sample once


def test_one_writer_per_prefix_and_no_silent_replacement(inputs, tmp_path):
    """Another live writer of the prefix, an existing dataset, or a folder as prefix: refused
    with exit 2 naming the cause, and nothing written; --overwrite replaces a dataset."""
    from eve_megatron.outputs import OutputLock

    prefix = str(tmp_path / "ds")
    with OutputLock(prefix, "dataset prefix"):  # a writer that is still running
        busy = _cli(inputs, prefix)
    assert busy.returncode == 2 and "is being written by pid" in busy.stderr
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".lock")
    assert _cli(inputs, prefix).returncode == 0
    before = open(prefix + ".idx", "rb").read()
    again = _cli(inputs, prefix, "--seq-length", "900")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert open(prefix + ".idx", "rb").read() == before
    assert _cli(inputs, prefix, "--seq-length", "900", "--overwrite").returncode == 0
    assert open(prefix + ".idx", "rb").read() != before
    for bad, words in ((["--output-prefix", str(tmp_path) + "/"], "not a folder"),
                       (["--max-image-size", "0"], "max_size must be")):
        res = _cli(inputs, prefix, *bad)
        assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr
