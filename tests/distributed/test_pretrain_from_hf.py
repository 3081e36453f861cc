"""The user's path from a Hugging Face LLM: import -> stage 0 training -> export.

The imported checkpoint is model-only, so the trainer loads it as weights (iteration 0,
fresh optimizer). Stage 0 trains only the patch embedding, so every text weight of the
export must equal the original Hugging Face weight bit for bit, while the patch embedding
must have moved away from the import's fresh initialisation. The training data's image
settings reach the export's image processor.
"""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from eve_megatron.launch import run_distributed
from eve_megatron.training import checkpointing
from tests.distributed.hf_workers import make_qwen2
from tests.training_data import TRAIN_IMAGES, write_train_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(*argv):
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def _safetensors(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    files = ["model.safetensors"]  # one shard: no index (the HF convention)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    return state


def test_import_train_stage0_export(tmp_path):
    hf_in, ckpt, s0, hf_out = (str(tmp_path / n) for n in ("hf_in", "import", "s0", "hf_out"))
    source = make_qwen2(hf_in, tied=False, seed=11)
    data = write_train_dataset(str(tmp_path / "train"), n=48, seed=4, vocab=500)
    _tool("tools/checkpoint/import_hf.py", "--hf", hf_in, "--save", ckpt,
          "--tensor-model-parallel-size", "2", "--vision-hidden-size", "32", "--no-progress")
    res = run_distributed("tests.distributed.pretrain_workers:stage_run", 2, data=data,
                          args=["--stage", "0", "--pretrained-checkpoint", ckpt, "--save", s0])
    assert checkpointing.latest_iteration(s0) == 2
    before, after = res[0]["before"], res[0]["after"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("embedding.patch_embedding.") for k in changed)
    _tool("tools/checkpoint/export_hf.py", "--load", s0, "--save", hf_out, "--no-progress")
    exported = _safetensors(hf_out)
    text = source.state_dict()
    assert set(text) <= set(exported)
    for name, tensor in text.items():
        assert torch.equal(exported[name], tensor), name
    patch = [k for k in exported if k not in text]
    assert patch and all("vision_tower" in k or "patch" in k for k in patch), patch
    with open(os.path.join(hf_out, "preprocessor_config.json")) as f:  # carried from the data
        pre = json.load(f)
    assert (pre["max_size"], pre["alpha"]) == (TRAIN_IMAGES["max_size"], TRAIN_IMAGES["alpha"])
