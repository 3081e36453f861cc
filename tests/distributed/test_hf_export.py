"""Megatron (TP2xPP2, PP2xVPP2) -> HF export: the HF model on the export equals Megatron.

Two reference models (``tests.reference_eve`` weights): EVEv2.0 (decoupling all, untied,
saved at TP2xPP2) and EVEv1.5 (decoupling mlp, tied, saved at PP2 with 2 virtual stages
and data parallel 2). Checks: round trip through HF back to a TP1 Megatron
checkpoint is bit-identical; HF logits on a batch with images of different aspect ratios
match Megatron's (fp32, rel. error <= 1e-5); KV-cache greedy ``generate`` on the export
gives the tokens of a cache-free greedy loop over Megatron logits; ``tools/generate.py``.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from eve_megatron.hf.config_map import IMAGE_TOKEN_INDEX
from eve_megatron.hf.export import export_checkpoint
from eve_megatron.hf.importer import import_rank, read_source
from eve_megatron.models.eve import EVEModel, eve_config, images_to_blocks
from eve_megatron.models.eve.sharding import gather_full, load_full_state_dict
from eve_megatron.training import checkpointing
from tests.distributed.conftest import REFERENCE_CASES
from tests.distributed.hf_workers import reference_full
from tests.reference_eve import RefShape, make_batch, rel_err
from tests.unit._data_helpers import random_rgb

TOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = REFERENCE_CASES


def _tool(name, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def exports(hf_world):
    """The checkpoints exported: v2 by tools/checkpoint/export_hf.py, v15 in-process."""
    out = {}
    for key, root in hf_world["megatron"].items():
        folder = str(hf_world["tmp"] / f"hf_{key}")
        args = dict(tokenizer=hf_world["tokenizer"], max_image_size=64, max_shard_bytes=200_000)
        if key == "v2":
            summary = json.loads(_tool(
                "checkpoint/export_hf.py", "--load", root, "--save", folder, "--tokenizer",
                args["tokenizer"], "--max-image-size", "64", "--max-shard-size", "0.0002",
                "--no-progress"))
        else:
            summary = export_checkpoint(root, folder, progress=False, **args)
        assert summary["shards"] > 1 and summary["tensors"] > 0
        out[key] = folder
    return out


def _megatron(key):
    case = CASES[key]
    model = EVEModel(eve_config("tiny", decoupling=case["decoupling"],
                                share_embeddings_and_output_weights=case["tied"])).eval()
    load_full_state_dict(model, reference_full(case["decoupling"], case["tied"], case["seed"]))
    return model


def _load_hf(folder):
    from tests.unit.conftest import load_eve

    return load_eve(folder)


@pytest.mark.parametrize("key", list(CASES))
def test_layout_and_round_trip_bit_identical(megatron_world, hf_world, exports, tmp_path, key):
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(checkpointing.iteration_dir(hf_world["megatron"][key], 5))
    assert "optimizer.state.exp_avg.decoder.final_layernorm.weight" in (
        stored.read_metadata().state_dict_metadata)  # trainer state the export skipped
    folder = exports[key]
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["EVEQwen2ForCausalLM"] and cfg["model_type"] == "eve-qwen2"
    assert cfg["add_moe"] and cfg["moe_part"] == {"v2": "layernorm-self_attn-mlp", "v15": "mlp"}[key]
    assert cfg["mm_hidden_size"] == 32 and cfg["mm_vision_tower"] == os.path.abspath(folder)
    with open(os.path.join(folder, "preprocessor_config.json")) as f:
        assert json.load(f)["max_size"] == 64
    for name in ("model.safetensors.index.json", "tokenizer.json", "modeling_eve_qwen2.py"):
        assert os.path.isfile(os.path.join(folder, name)), name
    save = str(tmp_path / "megatron_tp1")
    if key == "v2":
        _tool("checkpoint/import_hf.py", "--hf", folder, "--save", save, "--no-progress")
    else:  # the same rank function, in this process (world of one)
        import_rank(folder, save, 1, 1, read_source(folder), dtype="fp32")
    case = CASES[key]
    model = EVEModel(eve_config("tiny", decoupling=case["decoupling"],
                                share_embeddings_and_output_weights=case["tied"]))
    checkpointing.load_checkpoint(save, [model])
    assert checkpointing.read_image_settings(save) == {"max_image_size": 64, "alpha": "drop"}
    back = gather_full(model)
    original = reference_full(case["decoupling"], case["tied"], case["seed"])
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("key", list(CASES))
def test_hf_logits_match_megatron_on_images(megatron_world, exports, key):
    shape = RefShape(decoupling=CASES[key]["decoupling"], tied=CASES[key]["tied"])
    batch = make_batch(shape, 4, 48, seed=12, packed=False)
    ratios = {im.shape[2] / im.shape[1] for im in batch["images"]}
    assert len(ratios) >= 2, "the batch must mix aspect ratios"
    pv, grid = images_to_blocks(batch["images"])
    with torch.no_grad():
        ref = _megatron(key)(batch["tokens"], batch["position_ids"], batch["is_vision"],
                             batch["cu_seqlens"], batch["max_seqlen"], pv, grid)
        real = batch["segment_ids"] == batch["segment_ids"][:, :1]  # the first sample of a row
        ids = batch["tokens"].masked_fill(batch["is_vision"], IMAGE_TOKEN_INDEX)
        logits = _load_hf(exports[key])(input_ids=ids, attention_mask=real.long(),
                                        pixel_values=batch["images"]).logits
    assert rel_err(logits[real], ref[real]) <= TOL
    assert rel_err(logits[real], ref[real] * 1.001) > TOL


def _megatron_greedy(model, prompt, images, steps, stop):
    ids = list(prompt)
    pv, grid = images_to_blocks(images)
    for _ in range(steps):
        tokens = torch.tensor([ids])
        vis = tokens == IMAGE_TOKEN_INDEX
        with torch.no_grad():
            logits = model(tokens.masked_fill(vis, 0), torch.arange(len(ids))[None], vis,
                           pixel_values=pv, image_grid_hw=grid)
        nxt = int(logits[0, -1].argmax())
        if nxt == stop:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def test_greedy_generate_matches_megatron_loop(megatron_world, exports):
    from eve_megatron.hf.generation import greedy

    g = torch.Generator().manual_seed(4)
    image = torch.randn(3, 64, 96, generator=g)  # 2 x 3 blocks: 1 + 2 * 4 = 9 image tokens
    prompt = (torch.randint(3, 512, (5,), generator=g).tolist() + [IMAGE_TOKEN_INDEX] * 9
              + torch.randint(3, 512, (4,), generator=g).tolist())
    expected = _megatron_greedy(_megatron("v2"), prompt, [image], 12, stop=None)
    got = greedy(_load_hf(exports["v2"]), prompt, [image], 12, stop_id=None)
    assert got == expected and len(expected) == 12


def test_generate_tool_and_text_only_answer(megatron_world, exports, tmp_path):
    """tools/generate.py with an image (reference resize of a 50x37 image at max_size 64 ->
    96x64), and a text-only answer in-process: both equal Megatron's greedy answer (special
    tokens dropped, line breaks escaped)."""
    from eve_megatron.data.tokenizer import load_tokenizer
    from eve_megatron.hf.generation import answer, escape_line, load_export
    from eve_megatron.hf.image_processing_eve_qwen2 import EVEImageProcessor
    from eve_megatron.hf.processing import prompt_ids

    folder = exports["v2"]
    path = str(tmp_path / "img.png")
    Image.fromarray(random_rgb(50, 37, seed=3)).save(path)
    tok = load_tokenizer(folder)
    stop = tok.token_id("<|im_end|>")
    model = _megatron("v2")
    question = "What is in the picture?"
    images = [EVEImageProcessor(max_size=64).process_one(path)]
    assert tuple(images[0].shape) == (3, 64, 96)
    expected = _megatron_greedy(model, prompt_ids(tok, question, images), images, 6, stop)
    line = _tool("generate.py", "--model", folder, "--prompt", question, "--image", path,
                 "--max-new-tokens", "6")
    assert line == escape_line(tok.decode(expected, skip_special_tokens=True).strip())
    expected = _megatron_greedy(model, prompt_ids(tok, question, []), [], 6, stop)
    text, ids = answer(*load_export(folder), question, max_new_tokens=6)
    assert ids == expected and text == tok.decode(expected, skip_special_tokens=True).strip()


def _record_sums(folder):
    from eve_megatron.checksums import folder_files, hash_files, write_sums

    write_sums(folder, hash_files(folder, folder_files(folder)))


def test_export_errors_name_the_tensor_and_leave_nothing(exports, tmp_path):
    """A recorded architecture that disagrees with the stored tensors fails up front."""
    from eve_megatron.hf.export import export_checkpoint

    save = str(tmp_path / "out")
    for key, change, error, name in (
            ("v2", dict(ffn_hidden_size=96), ValueError, "decoder.layers.0.mlp.linear_fc1.weight"),
            ("v2", dict(num_layers=5), ValueError, "decoder.layers.0.input_layernorm.weight"),
            ("v15", dict(decoupling="all"), KeyError, "decoder.layers.0.vision_input_layernorm.weight"),
            ("v15", dict(decoupling="none"), ValueError, "decoder.layers.vision_mlp.linear_fc1.weight")):
        root = os.path.join(os.path.dirname(exports[key]), f"megatron_{key}")
        fields = checkpointing.read_model_fields(root)
        path = os.path.join(checkpointing.iteration_dir(root, 5), checkpointing.MODEL_JSON)
        try:
            with open(path, "w") as f:
                json.dump(dict(fields, **change), f)
            _record_sums(os.path.dirname(path))  # a consistent checkpoint, wrong architecture
            with pytest.raises(error, match=name.replace(".", r"\.")):
                export_checkpoint(root, save, progress=False)
        finally:
            with open(path, "w") as f:
                json.dump(fields, f)
            _record_sums(os.path.dirname(path))
        assert not os.path.exists(save) and not os.path.exists(save + ".tmp")
