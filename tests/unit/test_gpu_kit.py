"""The GPU verification kit's CPU side: pieces reassemble bit-exact (damage and gaps are named),
``prepare`` bundles a download folder into calls that fit, ``run.sh`` says when no GPU is
present. (The downloads themselves need the package index: ``prepare.py`` without
``--skip-download``; its cp312 requirement set is checked here.)"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools", "gpu"))

import pieces  # noqa: E402
import prepare  # noqa: E402


def _random_file(path, size, seed):
    import numpy as np

    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())


def test_pieces_join_bit_exact_and_name_damage(tmp_path):
    big = tmp_path / "te_core.whl"
    _random_file(big, 100_003, 1)
    manifest = pieces.split(str(big), str(tmp_path / "p"), piece_bytes=30_000)
    with open(manifest) as f:
        meta = json.load(f)
    assert [p["bytes"] for p in meta["pieces"]] == [30_000, 30_000, 30_000, 10_003]
    joined = pieces.join(manifest, str(tmp_path / "out"))
    assert open(joined, "rb").read() == big.read_bytes()
    part = tmp_path / "p" / meta["pieces"][2]["file"]
    data = bytearray(part.read_bytes())
    data[5] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="part02 .* is damaged"):
        pieces.join(manifest, str(tmp_path / "out2"))
    part.unlink()
    with pytest.raises(FileNotFoundError, match="part02 .* is missing"):
        pieces.join(manifest, str(tmp_path / "out2"))
    assert not (tmp_path / "out2" / "te_core.whl").exists()


def test_prepare_bundles_fit_a_call_and_big_files_travel_as_pieces(tmp_path):
    kit = tmp_path / "kit"
    downloads = kit / "downloads"
    downloads.mkdir(parents=True)
    sizes = {"a.whl": 40_000, "b.whl": 25_000, "c.whl": 20_000, "te.whl": 130_000,
             "requirements.txt": 50}
    for k, (name, size) in enumerate(sizes.items()):
        _random_file(downloads / name, size, k)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu", "prepare.py"),
                          "--out", str(kit), "--skip-download", "--bundle-mib",
                          str(60_000 / 2**20)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with open(kit / "plan.json") as f:
        plan = json.load(f)
    assert plan[-1]["command"] == "bash tools/gpu/run.sh"
    carried = {}
    for call in plan[:-1]:
        folder = os.path.join(ROOT, call["carry"][0])
        names = os.listdir(folder)
        assert sum(os.path.getsize(os.path.join(folder, n)) for n in names) <= 60_000
        for n in names:
            carried[n] = os.path.join(folder, n)
    assert {"a.whl", "b.whl", "c.whl", "requirements.txt", "te.whl.pieces.json"} <= set(carried)
    gathered = tmp_path / "all"
    gathered.mkdir()
    for n, path in carried.items():
        os.symlink(path, gathered / n)
    joined = pieces.join(str(gathered / "te.whl.pieces.json"), str(tmp_path / "wheels"))
    assert open(joined, "rb").read() == (downloads / "te.whl").read_bytes()


def test_requirement_closure_is_what_eve_megatron_needs_without_torch():
    pins = prepare.requirement_closure()
    assert {"megatron-core", "transformers", "numpy", "safetensors", "pytest"} <= {
        k.lower() for k in pins}
    assert not any(k.lower().startswith(("torch", "nvidia", "triton")) for k in pins)


def test_run_says_when_no_gpu_is_present(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run.sh would run the kit")
    out = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu", "run.sh")], cwd=ROOT,
                         env=dict(os.environ, OUT=str(tmp_path)), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 3 and "no CUDA GPU present" in out.stderr
    with open(tmp_path / "env.json") as f:
        assert json.load(f)["gpu"] is False
