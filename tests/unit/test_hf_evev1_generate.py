"""``tools/generate.py`` on an EVEv1 export: the vicuna_v1 prompt (token for token the
training template's), EVEv1's image size rule, greedy decoding equal to a cache-free greedy
loop over the Megatron EVEv1Model's logits, the answer on the last stdout line.

How each test fails: the tool using the qwen2 template or the EVEv2 resize rule (other
prompt ids or image grid), the KV-cache generation of the HF model diverging from Megatron's
greedy tokens, the image processor's size differing from ``evev1_image_rules``.
"""

import os
import subprocess
import sys

import torch
from PIL import Image

from eve_megatron.data.templates import LLAMA_EOS
from eve_megatron.data.tokenizer import load_tokenizer
from eve_megatron.hf.evev1_image_rules import evev1_size
from eve_megatron.hf.generation import escape_line, load_export
from eve_megatron.hf.processing import prompt_ids
from eve_megatron.models.eve.patch_embedding import images_to_blocks
from tests.unit._data_helpers import random_rgb
from tests.unit.test_hf_evev1_export import exported  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "What is in the picture?"
NEW = 6


def _megatron_greedy(model, ids, image, vocab, stop):
    """Cache-free greedy loop over EVEv1Model's logits (the padded vocabulary cut)."""
    pixels, grid = images_to_blocks([image], block=28)
    ids, out = list(ids), []
    for _ in range(NEW):
        t = torch.tensor([ids])
        s = t.shape[1]
        with torch.no_grad():
            logits = model(tokens=t.clamp_min(0), position_ids=torch.arange(s)[None],
                           is_vision=t == -200, cu_seqlens=torch.tensor([0, s], dtype=torch.int32),
                           max_seqlen=s, pixel_values=pixels, image_grid_hw=grid)
        nxt = int(logits[0, -1, :vocab].argmax())
        if nxt == stop:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def test_generate_tool_answers_like_megatron_greedy(exported, tmp_path):  # noqa: F811
    model, folder = exported
    path = str(tmp_path / "odd.png")
    Image.fromarray(random_rgb(61, 37, seed=4)).save(path)  # 61 x 37: odd aspect ratio
    hf, tokenizer, processor = load_export(folder)
    pixels = processor.process_one(path)
    assert tuple(pixels.shape[1:]) == evev1_size(61, 37, 2)[::-1]  # (H, W) = (420, 672)
    ids = prompt_ids(load_tokenizer(folder), PROMPT, [pixels], "vicuna_v1", block=28)
    text = tokenizer.decode([i for i in ids if i >= 0])
    assert ids[0] == 1 and "curious user" in text and "USER: " in text
    assert text.endswith(f"\n{PROMPT} ASSISTANT:")  # the answer starts after it
    assert ids.count(-200) == 1 + 15 * (24 + 1)  # 420 x 672 pixels: 15 x 24 tokens
    new = _megatron_greedy(model, ids, pixels, 400, tokenizer.token_id(LLAMA_EOS))
    expected = escape_line(tokenizer.decode(new, skip_special_tokens=True).strip())
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"),
                           "--model", folder, "--image", path, "--prompt", PROMPT,
                           "--max-new-tokens", str(NEW)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == expected
