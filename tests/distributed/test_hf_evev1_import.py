"""EVEv1 HF -> Megatron import (``import_hf.py --hf DIR [--teacher CLIP_DIR]``).

- An EVE-7B-v1.0-layout folder (our export of a random EVEv1Model) imported at TP2 x PP2 and
  exported again gives the same folder: every tensor bit for bit, the same config.json.
- The same folder with the teacher stored under the release's alias name imports the same.
- A plain Llama folder + an HF CLIPVisionModel folder (built here with transformers) become
  an EVEv1 checkpoint: its export's HF model gives transformers' Llama logits on text
  (fp32, <= 1e-5), the teacher is the CLIP model's first n-1 layers bit for bit, the PEL and
  PAL are fresh; without --teacher the tool names the missing CLIP tensor.

How each can fail: a rule of the EVEv1 table that does not invert, TP/PP slicing of a
replicated PEL/PAL/teacher weight, a vocabulary or config key changing on the way, q/k/v or
gate/up merged in the wrong order (Llama logits), the teacher read from the wrong names.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from eve_megatron.hf.export import export_checkpoint
from eve_megatron.hf.hf_files import HFWeights
from eve_megatron.hf.importer import import_hf
from eve_megatron.hf.mapping_evev1 import CLIP, CLIP_ALIAS
from eve_megatron.training import checkpointing
from tests.unit._data_helpers import make_llama_sp_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-5


def _save_evev1(root: str) -> None:
    """A random EVEv1Model (reference weights, vocab 400) saved as a checkpoint."""
    from eve_megatron.parallel import ParallelConfig, initialize_parallel
    from tests.reference_evev1 import EVEv1Shape, random_weights
    from tests.unit.test_evev1_model import _megatron_weights, config_of
    from eve_megatron.models.evev1 import EVEv1Model

    initialize_parallel(ParallelConfig())
    shape = EVEv1Shape(vocab=400)
    torch.manual_seed(3)
    model = EVEv1Model(config_of(shape))
    model.load_state_dict(_megatron_weights(model, random_weights(shape, 9)), strict=True)
    checkpointing.save_checkpoint(root, 2, [model])


def _same_folders(a: str, b: str) -> None:
    wa, wb = HFWeights(a), HFWeights(b)
    assert sorted(wa.names()) == sorted(wb.names())
    for name in wa.names():
        assert torch.equal(wa.read(name), wb.read(name)), name
    configs = []
    for folder in (a, b):
        with open(os.path.join(folder, "config.json")) as f:
            configs.append(json.load(f))
    assert configs[0] == configs[1]


def test_evev1_folder_round_trip_tp2pp2_is_bit_exact(tmp_path):
    tok = make_llama_sp_tokenizer(str(tmp_path / "tok"))
    _save_evev1(str(tmp_path / "ckpt"))
    first = str(tmp_path / "hf1")
    export_checkpoint(str(tmp_path / "ckpt"), first, tokenizer=tok, progress=False)
    summary = import_hf(first, str(tmp_path / "imported"), tp=2, pp=2, progress=False)
    assert summary["family"] == "evev1" and summary["fresh"] == 0
    assert summary["unused_hf_tensors"] == []
    fields = checkpointing.read_model_fields(str(tmp_path / "imported"))
    assert fields == checkpointing.read_model_fields(str(tmp_path / "ckpt"))
    second = str(tmp_path / "hf2")
    export_checkpoint(str(tmp_path / "imported"), second, tokenizer=tok, progress=False)
    _same_folders(first, second)


def _rename_teacher(src: str, dst: str, new_prefix: str) -> None:
    """A copy of the export ``src`` whose teacher tensors are stored under ``new_prefix``."""
    import glob
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "SHA256SUMS"))
    for path in glob.glob(os.path.join(dst, "*.safetensors")):
        tensors = {(new_prefix + k[len(CLIP):] if k.startswith(CLIP) else k): v
                   for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
    index = os.path.join(dst, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            meta = json.load(f)
        meta["weight_map"] = {(new_prefix + k[len(CLIP):] if k.startswith(CLIP) else k): v
                              for k, v in meta["weight_map"].items()}
        with open(index, "w") as f:
            json.dump(meta, f)


def test_teacher_stored_under_the_release_alias_is_imported(tmp_path):
    """The release's teacher is one module seen twice (``vision_clip`` and the PAL's
    ``clip_layer``); a folder keeping it only under the alias imports the same teacher."""
    tok = make_llama_sp_tokenizer(str(tmp_path / "tok"))
    _save_evev1(str(tmp_path / "ckpt"))
    first = str(tmp_path / "hf1")
    export_checkpoint(str(tmp_path / "ckpt"), first, tokenizer=tok, progress=False)
    aliased = str(tmp_path / "aliased")
    _rename_teacher(first, aliased, CLIP_ALIAS)
    assert not any(n.startswith(CLIP) for n in HFWeights(aliased).names())
    summary = import_hf(aliased, str(tmp_path / "imported"), progress=False)
    assert summary["fresh"] == 0 and summary["unused_hf_tensors"] == []
    second = str(tmp_path / "hf2")
    export_checkpoint(str(tmp_path / "imported"), second, tokenizer=tok, progress=False)
    _same_folders(first, second)
    _rename_teacher(first, str(tmp_path / "elsewhere"), "model.some_other.vision_model.")
    with pytest.raises(KeyError, match="embeddings.class_embedding"):
        import_hf(str(tmp_path / "elsewhere"), str(tmp_path / "none"), progress=False)


def _llama_and_clip(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)).eval()
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=56, patch_size=14)).eval()
    paths = str(tmp_path / "llama"), str(tmp_path / "clip")
    llama.save_pretrained(paths[0])
    clip.save_pretrained(paths[1])
    return llama, clip, paths


def test_llama_plus_clip_import_keeps_llama_logits_and_the_teacher(tmp_path):
    llama, clip, (llama_dir, clip_dir) = _llama_and_clip(tmp_path)
    tok = make_llama_sp_tokenizer(str(tmp_path / "tok"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools/checkpoint/import_hf.py"),
                           "--hf", llama_dir, "--save", str(tmp_path / "no_teacher")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and CLIP + "embeddings.class_embedding" in proc.stderr
    assert "--teacher" in proc.stderr and not os.path.exists(tmp_path / "no_teacher")
    summary = import_hf(llama_dir, str(tmp_path / "ckpt"), vision_hidden_size=32,
                        progress=False, teacher=clip_dir)
    assert summary["family"] == "evev1" and summary["fresh"] > 0
    fields = checkpointing.read_model_fields(str(tmp_path / "ckpt"))
    assert (fields["teacher_hidden_size"], fields["teacher_num_layers"]) == (32, 3)
    out = str(tmp_path / "hf")
    export_checkpoint(str(tmp_path / "ckpt"), out, tokenizer=tok, progress=False)
    exported = HFWeights(out)
    # transformers 4.x names the tower's tensors "vision_model.*", 5.x leaves the prefix out
    clip_state = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items()}
    for name in exported.names():
        if name.startswith(CLIP):
            assert torch.equal(exported.read(name), clip_state[name[len(CLIP):]])
    assert not any(n.startswith(CLIP + "encoder.layers.2.") for n in exported.names())
    llama_state = llama.state_dict()
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.3.mlp.up_proj.weight",
                 "lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(exported.read(name), llama_state[name]), name

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                              local_files_only=True).eval()
    ids = torch.tensor([[1, 17, 250, 3, 399, 42, 8, 2, 77]])
    with torch.no_grad():
        ours, theirs = hf(input_ids=ids).logits, llama(input_ids=ids).logits
    err = float((ours - theirs).norm() / theirs.norm())
    assert err <= TOL
    assert float((ours - 1.001 * theirs).norm() / theirs.norm()) > TOL  # the check can fail
