"""HF Qwen2 -> Megatron import: same text logits as transformers (fp32, rel. error <= 1e-5)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from eve_megatron.hf.importer import import_hf
from tests.distributed.conftest import QWEN2_CASES
from tests.distributed.hf_workers import make_qwen2
from tests.reference_eve import rel_err

TOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("case", range(len(QWEN2_CASES)),
                         ids=[f"tied={t}-{f}-decoupling={d}" for t, f, d in QWEN2_CASES])
def test_qwen2_import_tp2pp2_matches_transformers(hf_world, case):
    """Imported at TP2xPP2 (a tied .bin folder with vision copies of the text weights, an
    untied sharded-safetensors folder without): text logits equal transformers'."""
    reference, per_rank = hf_world["qwen2"][case]
    last = [x for x in per_rank if x is not None]
    assert len(last) == 2  # the two tensor-parallel ranks of the last stage
    assert torch.equal(last[0], last[1])
    assert rel_err(last[0], reference) <= TOL
    assert rel_err(last[0], reference * 1.001) > TOL  # the check can fail


def test_missing_tensor_is_named_and_nothing_is_written(tmp_path):
    hf_dir = str(tmp_path / "qwen2")
    make_qwen2(hf_dir, tied=False, seed=1, fmt="safetensors")
    index_path = os.path.join(hf_dir, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    del index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    with open(index_path, "w") as f:
        json.dump(index, f)
    save = str(tmp_path / "ckpt")
    with pytest.raises(KeyError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        import_hf(hf_dir, save, vision_hidden_size=32, progress=False)
    assert not os.path.exists(save) and not os.path.exists(save + ".tmp")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools/checkpoint/import_hf.py"),
                           "--hf", hf_dir, "--save", save, "--vision-hidden-size", "32"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "model.layers.2.mlp.up_proj.weight" in proc.stderr
    assert not os.path.exists(save)
