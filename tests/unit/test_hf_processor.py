"""The exported folder used like a transformers VLM: processor, chat template, Auto classes,
save/load, pipeline, and the settings the official EVEv2 code reads. Runs on whichever
transformers release is installed (CI: both ends of the tested range)."""

import io
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from eve_megatron.data.images import ImageConfig, decode_rgb, prepare_image
from eve_megatron.data.templates import render_conversation
from eve_megatron.data.tokenizer import load_tokenizer
from eve_megatron.hf import eve_image_rules as rules
from eve_megatron.hf.eve_prompt import CHAT_TEMPLATE, IMAGE_TOKEN_INDEX
from eve_megatron.hf.processing import prompt_ids
from tests.unit.conftest import EXPORT_IMAGES, load_eve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def processor(eve_export):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(eve_export["dir"], trust_remote_code=True)


def _rgb(w, h, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_auto_classes_load_without_eve_megatron_code(eve_export, processor):
    from transformers import AutoModel, AutoTokenizer

    folder = eve_export["dir"]
    assert type(processor).__name__ == "EVEProcessor"
    assert type(processor.image_processor).__name__ == "EVEImageProcessor"
    for name in os.listdir(folder):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                assert not re.search(r"^\s*(from|import)\s+eve_megatron", f.read(), re.M), name
    tokenizer = AutoTokenizer.from_pretrained(folder)  # no trust_remote_code: must not ask
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.pad_token is not None
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(base).__name__ == "EVEQwen2Model"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        hidden = base(input_ids=ids).last_hidden_state
        logits = load_eve(folder)(input_ids=ids).logits
    assert torch.allclose(logits, hidden @ load_eve(folder).lm_head.weight.t(), atol=1e-5)


def test_image_processor_modes_and_input_kinds(processor, tmp_path):
    ip = processor.image_processor
    arr = _rgb(50, 37, 1)
    infer = ip(Image.fromarray(arr))["pixel_values"]
    assert tuple(infer.shape) == (1, 3, 64, 96)  # area ~64^2, sides rounded up to 32
    assert tuple(ip(Image.fromarray(arr), resize_mode="train")["pixel_values"].shape) == (1, 3, 32, 64)
    expected = torch.from_numpy(rules.normalize(rules.resize(Image.fromarray(arr), 64, "infer")))
    assert torch.equal(infer[0], expected)
    path = str(tmp_path / "img.png")
    Image.fromarray(arr).save(path)
    with open(path, "rb") as f:
        data = f.read()
    for kind in (arr, arr.transpose(2, 0, 1), torch.from_numpy(arr.transpose(2, 0, 1)),
                 arr.astype(np.float32) / 255, path, data):
        assert torch.equal(ip.process_one(kind), expected)
    grey = Image.fromarray(arr[..., 0])
    assert torch.equal(ip.process_one(grey), ip.process_one(grey.convert("RGB")))
    cmyk = Image.fromarray(arr).convert("CMYK")
    assert torch.equal(ip.process_one(cmyk), ip.process_one(cmyk.convert("RGB")))
    deep = Image.fromarray((arr[..., 0].astype(np.uint16) * 257))
    assert torch.equal(ip.process_one(deep), ip.process_one(grey))  # 16 bits scaled to 8
    batch = ip([Image.fromarray(arr), Image.fromarray(_rgb(30, 90, 2))])
    assert isinstance(batch["pixel_values"], list) and batch["image_sizes"].tolist() == [[64, 96], [128, 64]]


def test_transparency_rule_is_the_same_in_training_and_inference(processor):
    rgba = np.random.default_rng(3).integers(0, 256, (64, 96, 4), dtype=np.uint8)
    img = Image.fromarray(rgba)
    dropped = processor.image_processor.process_one(img, resize_mode="train")
    assert torch.equal(dropped, processor.image_processor.process_one(img.convert("RGB"),
                                                                      resize_mode="train"))
    white = processor.image_processor.process_one(img, resize_mode="train", alpha="white")
    assert not torch.equal(dropped, white)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    for alpha, pixels in (("drop", dropped), ("white", white)):
        stored, _, _ = prepare_image(buf.getvalue(), ImageConfig(max_size=64, encode_format="png",
                                                                 alpha=alpha))
        trained = torch.from_numpy(rules.normalize(Image.fromarray(decode_rgb(stored))))
        assert torch.equal(trained, pixels), alpha


def test_chat_template_is_the_training_template(eve_export, processor):
    tok = load_tokenizer(eve_export["dir"])
    conversations = [
        [("user", "<image>\nWhat is this?"), ("assistant", "A cat.")],
        [("system", "Be brief."), ("user", "Hi <image> there"), ("assistant", "Hello."),
         ("user", "And this?"), ("assistant", "A dog.")],
        [("user", "No image here."), ("assistant", "Fine.")],
    ]
    for turns in conversations:
        n = sum(q.count("<image>") for r, q in turns if r == "user")
        segments = render_conversation(turns, n, "qwen2")
        want = "".join("<image>" if s.image >= 0 else s.text for s in segments)
        messages = [{"role": r, "content": q} for r, q in turns]
        assert processor.apply_chat_template(messages) == want
        assert processor.tokenizer.apply_chat_template(messages, tokenize=False) == want
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert processor.apply_chat_template(parts) == processor.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is this?"}])
    # token for token the training prompt, image positions expanded
    images = [torch.from_numpy(rules.normalize(rules.resize(Image.fromarray(_rgb(50, 37, 4)), 64)))]
    for imgs in (images, []):
        text = processor.apply_chat_template(parts if imgs else [{"role": "user", "content": "What is this?"}])
        got = processor(text=text, images=[Image.fromarray(_rgb(50, 37, 4))] if imgs else None)
        assert got["input_ids"][0].tolist() == prompt_ids(tok, "What is this?", imgs)
    assert (got["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 0
    expanded = processor(text=text + "<image>", images=Image.fromarray(_rgb(50, 37, 4)))["input_ids"]
    assert int((expanded == IMAGE_TOKEN_INDEX).sum()) == rules.image_token_count(2, 3)
    with pytest.raises(ValueError, match="markers"):
        processor(text="no marker", images=Image.fromarray(_rgb(50, 37, 4)))


def test_save_pretrained_round_trip_and_generate_tool(eve_export, processor, tmp_path):
    folder = str(tmp_path / "saved")
    model = load_eve(eve_export["dir"])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "preprocessor_config.json"))  # the official code's
    from transformers import AutoProcessor

    again = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.fromarray(_rgb(50, 37, 5))
    text = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat is this?"}])
    a, b = processor(text=text, images=image), again(text=text, images=image)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(**a).logits, load_eve(folder)(**b).logits)
    path = str(tmp_path / "img.png")
    image.save(path)
    lines = []
    for where in (eve_export["dir"], folder):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--model",
                               where, "--image", path, "--prompt", "What is this?",
                               "--max-new-tokens", "8"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines.append(proc.stdout.strip().splitlines()[-1])
    assert lines[0] == lines[1] and "<|im_start|>" not in lines[0]


def test_image_text_to_text_pipeline(eve_export, processor):
    from transformers.pipelines import SUPPORTED_TASKS

    if "image-text-to-text" not in SUPPORTED_TASKS:
        pytest.skip("this transformers release has no image-text-to-text pipeline")
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=load_eve(eve_export["dir"]), processor=processor)
    image = Image.fromarray(_rgb(50, 37, 6))
    text = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat is this?"}])
    out = pipe(images=image, text=text, generate_kwargs={"max_new_tokens": 6, "do_sample": False},
               return_full_text=False)
    inputs = processor(text=text, images=image)
    new = load_eve(eve_export["dir"]).generate(**inputs, max_new_tokens=6, do_sample=False)
    want = processor.batch_decode(new[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert out[0]["generated_text"] == want


def test_official_code_settings(eve_export, tmp_path, monkeypatch):
    """What the official EVEv2 code reads: config.mm_vision_tower loads with
    CLIPImageProcessor from any working directory; the training image size is carried."""
    from transformers import CLIPImageProcessor

    with open(os.path.join(eve_export["dir"], "config.json")) as f:
        cfg = json.load(f)
    monkeypatch.chdir(tmp_path)
    official = CLIPImageProcessor.from_pretrained(cfg["mm_vision_tower"])
    assert official.max_size == EXPORT_IMAGES["max_image_size"] and official.patch_stride == 16
    assert official.alpha == EXPORT_IMAGES["alpha"] and not official.do_resize
