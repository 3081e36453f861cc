"""The HF-side EVE model against the plain reference, and the inference preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

from eve_megatron.data.images import CLIP_MEAN, CLIP_STD
from eve_megatron.data.templates import render_conversation, tokenize_segments
from eve_megatron.data.tokenizer import load_tokenizer
from eve_megatron.hf import config_map
from eve_megatron.hf.configuration_eve_qwen2 import EVEQwen2Config
from eve_megatron.hf.modeling_eve_qwen2 import EVEQwen2ForCausalLM
from eve_megatron.hf.eve_image_rules import inference_size, normalize, resize
from eve_megatron.hf.processing import prompt_ids
from eve_megatron.models.eve import eve_config
from eve_megatron.models.eve.config import model_fields
from tests.reference_eve import RefShape, forward, make_batch, make_weights, rel_err
from tests.unit._data_helpers import make_hf_tokenizer
from tests.unit.test_hf_mapping import reference_hf

TOL = 1e-5


@pytest.mark.parametrize("decoupling,tied", [("all", False), ("mlp", True), ("none", False)])
def test_hf_model_matches_reference_blend(decoupling, tied):
    """Routed HF model == the reference's dense text/vision blend, with images of several
    aspect ratios and right padding."""
    shape = RefShape(decoupling=decoupling, tied=tied)
    w = make_weights(shape, seed=8)
    fields = model_fields(eve_config("tiny", decoupling=decoupling,
                                     share_embeddings_and_output_weights=tied))
    model = EVEQwen2ForCausalLM(EVEQwen2Config(**config_map.hf_config(fields, "float32")))
    missing, unexpected = model.load_state_dict(reference_hf(w, shape), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    batch = make_batch(shape, 3, 48, seed=12, packed=False)
    real = batch["segment_ids"] == batch["segment_ids"][:, :1]
    batch["segment_ids"] = torch.where(real, 0, 1)
    ids = batch["tokens"].masked_fill(batch["is_vision"], config_map.IMAGE_TOKEN_INDEX)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids, attention_mask=real.long(),
                              pixel_values=batch["images"]).logits
    ref = forward(w, shape, batch)
    assert len({im.shape[1:] for im in batch["images"]}) >= 2
    assert rel_err(logits[real], ref[real]) <= TOL
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=ids, pixel_values=batch["images"][:-1])


def test_inference_resize_is_the_reference_rule():
    # s = sqrt(1000*500)/800: 1000/s = 1131.4 -> 36 blocks, 500/s = 565.7 -> 18 blocks (up)
    assert inference_size(1000, 500, 800) == (1152, 576)
    assert inference_size(100, 50, 800) == (1152, 576)  # small images are scaled up
    assert inference_size(1600, 1600, 1600) == (1600, 1600)
    assert inference_size(4000, 10, 64) == (1280, 32)  # s = 3.125; 10/s -> one block
    img = Image.fromarray(np.zeros((37, 50, 3), dtype=np.uint8))
    assert resize(img, 64).size == (96, 64)
    assert resize(img, 64, "train").size == (64, 32)  # AnyRatio: no upscaling
    with pytest.raises(ValueError, match="resize mode"):
        resize(img, 64, "nearest")


def test_normalize_equals_clip_image_processor():
    from transformers import CLIPImageProcessor

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    clip = CLIPImageProcessor(do_resize=False, do_center_crop=False, do_normalize=True,
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    expected = clip.preprocess(img, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(torch.from_numpy(normalize(img)), expected, atol=1e-6)


def test_prompt_is_the_training_rendering_up_to_the_answer(tmp_path):
    tok = load_tokenizer(make_hf_tokenizer(str(tmp_path / "tok")))
    question = "What is in the picture?"
    for n_images in (0, 1):
        images = [torch.zeros(3, 64, 96)] * n_images  # 2 x 3 blocks: 9 image tokens
        marker = "<image>\n" * n_images
        segments = render_conversation([("user", marker + question), ("assistant", "A cat.")],
                                       n_images, "qwen2")
        tokens, mask, image_pos = tokenize_segments(segments, tok)
        prompt = tokens[:mask.index(1)]
        ids = prompt_ids(tok, question, images)
        expected = (prompt[:image_pos[0]] + [config_map.IMAGE_TOKEN_INDEX] * 9
                    + prompt[image_pos[0]:]) if n_images else prompt
        assert ids == expected
        assert tok.decode([t for t in ids if t >= 0]).endswith(" ASSISTANT:")
        assert tok.decode([t for t in ids if t >= 0]).startswith("A chat between a curious user")


def test_generate_tool_output_is_one_line():
    from eve_megatron.hf.generation import escape_line

    assert escape_line("two\nlines \\ and\r\n") == "two\\nlines \\\\ and\\r\\n"
    assert "\n" not in escape_line("a\n\nb")


def test_shipped_modules_import_their_whole_closure_directly():
    """transformers 4.x copies only the direct relative imports of an auto_map module into its
    module cache: each entry module must import every shipped module it needs itself."""
    import os
    import re

    from eve_megatron.hf.export_files import CODE_FILES

    here = os.path.dirname(os.path.abspath(config_map.__file__))

    def direct(name):
        with open(os.path.join(here, name)) as f:
            return {m + ".py" for m in re.findall(r"^from \.(\w+) import", f.read(), re.M)}

    for entry in ("modeling_eve_qwen2.py", "processing_eve_qwen2.py",
                  "image_processing_eve_qwen2.py", "configuration_eve_qwen2.py"):
        closure, todo = set(), [entry]
        while todo:
            for dep in direct(todo.pop()) - closure:
                closure.add(dep)
                todo.append(dep)
        assert closure <= direct(entry), (entry, closure - direct(entry))
        assert closure <= set(CODE_FILES), entry
