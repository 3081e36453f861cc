"""Preprocessing checks every source before any work: all problems in one error (exit 2,
one line each naming the file and the reason), no sample read, no file (not even the lock)
created. Real files, real tokenizers, the real CLI."""

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from eve_megatron.data import preflight
from eve_megatron.data import preprocess as pp
from tests.unit._data_helpers import encode, make_hf_tokenizer, random_rgb

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tar(path, members, compress=False):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = gzip.compress(raw.getvalue()) if compress else raw.getvalue()
    open(path, "wb").write(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good inputs of every kind next to bad ones; ``{name: path}`` plus the tokenizer."""
    d = tmp_path_factory.mktemp("preflight")
    (d / "img").mkdir()
    Image.fromarray(random_rgb(64, 48, 1)).save(d / "img" / "a.png")
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A thing."}]
    good = {"good.json": json.dumps([{"id": "x", "image": "a.png", "conversations": conv}]),
            "good.jsonl": json.dumps({"text": "a plain text document"}) + "\n",
            "dict.json": json.dumps({"id": "x", "conversations": conv}),
            "empty.jsonl": "", "notes.txt": "not an input\n", "data.csv": "a,b\n1,2\n",
            "fake.tar": "this is text, not a tar archive\n"}
    for name, text in good.items():
        (d / name).write_text(text)
    (d / "binary.jsonl").write_bytes(b"\x00\x01\x02" * 50)
    pair = {"k0.png": encode(Image.fromarray(random_rgb(40, 40, 2)), "PNG"), "k0.txt": b"cap"}
    _tar(d / "good.tar", pair)
    _tar(d / "good.tar.gz", pair, compress=True)
    (d / "folder.jsonl").mkdir()
    os.symlink(d / "gone.json", d / "dangling.json")
    paths = {p.name: str(p) for p in d.iterdir()}
    paths["missing.json"] = str(d / "missing.json")
    paths["dir"] = str(d)
    paths["tok"] = make_hf_tokenizer(str(d / "tok"))
    return paths


BAD = {"missing.json": "does not exist", "dangling.json": "does not exist (a broken link)",
       "folder.jsonl": "is a folder, not an input file", "empty.jsonl": "is empty",
       "dict.json": "is not a JSON list", "binary.jsonl": "holds binary data",
       "fake.tar": "is not a tar archive", "notes.txt": "unknown format (use .json, .jsonl",
       "data.csv": "unknown format"}
GOOD = ("good.json", "good.jsonl", "good.tar", "good.tar.gz")


def test_each_kind_of_input_is_judged(files):
    for name in GOOD:
        assert preflight.input_problem(files[name]) is None, name
    for name, why in BAD.items():
        assert (preflight.input_problem(files[name]) or "").startswith(why), name


def test_cli_names_every_bad_source_at_once_and_writes_nothing(files, tmp_path):
    """Nine bad inputs among four good ones, a missing image root and a tokenizer that is not
    one: one error, one line per problem, exit 2; the output folder is never created (no
    lock, no partial dataset)."""
    inputs = [files[n] for n in ("good.json", *BAD, "good.jsonl", "good.tar", "good.tar.gz")]
    out = tmp_path / "out" / "ds"
    cmd = [sys.executable, "-m", "eve_megatron.tools.preprocess_data", "--input", *inputs,
           "--image-root", str(tmp_path / "no_images"), "--tokenizer", files["notes.txt"],
           "--seq-length", "64", "--output-prefix", str(out), "--workers", "0", "--no-progress"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0] == ("preprocess_data: error: 11 problems found before any work "
                        "(nothing was written):")
    body = [line.strip() for line in lines[1:]]
    assert body[:len(BAD)] == [f"--input {files[n]}: {preflight.input_problem(files[n])}"
                               for n in BAD]
    for line, why in zip(body, BAD.values()):
        assert why in line
    assert body[len(BAD)] == f"--image-root {tmp_path / 'no_images'} is not a directory"
    assert body[len(BAD) + 1].startswith("--tokenizer: ") and files["notes.txt"] in body[-1]
    assert len(body) == len(BAD) + 2 and not any(files[g] + ":" in res.stderr for g in GOOD)
    assert os.listdir(tmp_path) == []  # not even the output folder or its lock


def test_a_missing_last_input_stops_the_run_before_the_first_is_read(files, tmp_path):
    """Before, the first inputs were processed (for hours) and the run died at the missing one."""
    cfg = pp.PreprocessConfig(inputs=[files["good.json"], files["good.tar"], files["missing.json"]],
                              output_prefix=str(tmp_path / "out" / "ds"), tokenizer=files["tok"],
                              image_root=os.path.join(files["dir"], "img"), workers=0,
                              progress=False)
    with pytest.raises(preflight.PreflightError) as err:
        pp.run_preprocess(cfg)
    assert err.value.problems == [f"--input {files['missing.json']}: does not exist"]
    assert str(err.value).splitlines()[0] == \
        "1 problem found before any work (nothing was written):"
    assert os.listdir(tmp_path) == []


def test_output_prefix_and_tokenizer_problems_join_the_input_ones(files, tmp_path):
    """In-process: a tokenizer without the template's special token, an output prefix whose
    folder is a file, an existing dataset without --overwrite; each one line."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.train_from_iterator(["just words, no chat tokens"] * 5,
                              trainers.BpeTrainer(vocab_size=300, show_progress=False))
    os.makedirs(tmp_path / "plain_tok")
    plain.save(str(tmp_path / "plain_tok" / "tokenizer.json"))
    (tmp_path / "blocker").write_text("a file")
    cfg = pp.PreprocessConfig(inputs=[files["good.json"], files["missing.json"]],
                              output_prefix=str(tmp_path / "blocker" / "sub" / "ds"),
                              tokenizer=str(tmp_path / "plain_tok"), template="qwen2",
                              image_root=os.path.join(files["dir"], "img"), progress=False)
    with pytest.raises(preflight.PreflightError) as err:
        pp.run_preprocess(cfg)
    assert err.value.problems == [
        f"--input {files['missing.json']}: does not exist",
        f"--tokenizer: tokenizer {tmp_path / 'plain_tok'} has no single token for "
        "'<|im_end|>', which the 'qwen2' template needs",
        f"--output-prefix {cfg.output_prefix}: {tmp_path / 'blocker'} is a file, not a folder"]
    assert sorted(os.listdir(tmp_path)) == ["blocker", "plain_tok"]
    (tmp_path / "old.bin").write_bytes(b"x")
    cfg.output_prefix, cfg.inputs = str(tmp_path / "old"), [files["good.json"]]
    cfg.tokenizer = files["tok"]
    assert preflight.output_problems(cfg.output_prefix, False) == [
        f"a dataset already exists at {cfg.output_prefix}.bin: pass --overwrite to replace it, "
        "or choose another --output-prefix"]
    assert preflight.output_problems(cfg.output_prefix, True) == []
    assert preflight.output_problems(str(tmp_path / "new" / "deeper" / "ds"), False) == []


def test_settings_problems_are_all_listed(files, tmp_path):
    cfg = pp.PreprocessConfig(inputs=[], output_prefix=str(tmp_path / "x"), tokenizer=files["tok"],
                              template="llama", seq_length=1, max_bad_fraction=2.0)
    with pytest.raises(ValueError) as err:
        cfg.validate()
    assert [p.split()[0] for p in err.value.problems] == [
        "at", "--template", "--seq-length", "--max-bad-fraction"]


def test_good_sources_pass_and_the_run_uses_them(files, tmp_path):
    cfg = pp.PreprocessConfig(inputs=[files[n] for n in GOOD], output_prefix=str(tmp_path / "ok"),
                              tokenizer=files["tok"], template="qwen2", seq_length=256,
                              image_root=os.path.join(files["dir"], "img"), workers=0,
                              progress=False)
    summary = pp.run_preprocess(cfg)
    assert (summary["written"], summary["skipped"]) == (4, 0)  # json, jsonl, tar, tar.gz


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes files whatever their mode")
def test_unreadable_input_and_unwritable_output_are_named(files, tmp_path):
    locked = tmp_path / "locked.jsonl"
    locked.write_text(json.dumps({"text": "x"}) + "\n")
    locked.chmod(0)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        assert preflight.input_problem(str(locked)) == "cannot be read: Permission denied"
        assert preflight.output_problems(str(tmp_path / "ro" / "ds"), False) == [
            f"--output-prefix {tmp_path / 'ro' / 'ds'}: folder {tmp_path / 'ro'} is not writable"]
    finally:
        (tmp_path / "ro").chmod(0o700)
