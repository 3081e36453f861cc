"""EVEv1 data (issue 13, Data): templates and masks, the resize rule, the teacher image.

Sizes are computed by hand from evev1_reference.md §1 (base long side 336, short side
``ceil(336 s / l / 14) * 14``, student = base x ratio) and §2 (teacher: base image centred
on 336x336, offsets ``(24 - patches) // 2 * 14``). The template test compares with an
independent re-implementation of LLaVA's ``tokenizer_image_token`` + ``preprocess_v1``
count rule on a tiny Llama-shaped sentencepiece model.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from eve_megatron.data.images import ImageConfig, prepare_evev1_image
from eve_megatron.data.templates import (VICUNA_V1_SYSTEM, normalise_turns, render_caption,
                                         render_conversation, render_text, tokenize_segments)
from eve_megatron.data.tokenizer import load_tokenizer
from eve_megatron.hf import evev1_image_rules as rules
from tests.unit._data_helpers import encode, make_llama_sp_tokenizer, random_rgb

IMG = -200  # LLaVA's IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_llama_sp_tokenizer(str(tmp_path_factory.mktemp("llama_sp"))))


def _ours(segments, tok):
    """Our tokens with each image as one IMG id, and the supervised flags."""
    tokens, mask, pos = tokenize_segments(segments, tok)
    for p in reversed(pos):
        tokens, mask = tokens[:p] + [IMG] + tokens[p:], mask[:p] + [0] + mask[p:]
    return tokens, mask


def _slow_tokenize(sp, text):
    """HF slow LlamaTokenizer(text).input_ids: BOS, then "</s>" split out as eos 2 and each
    piece encoded on its own (dummy prefix each)."""
    ids = [1]
    for k, piece in enumerate(text.split("</s>")):
        ids += ([2] if k else []) + (list(sp.encode(piece)) if piece else [])
    return ids


def _image_tokenize(sp, prompt):
    """LLaVA mm_utils.tokenizer_image_token: chunks split on <image>, BOS kept once."""
    chunks = [_slow_tokenize(sp, c) for c in prompt.split("<image>")]
    out = [1]
    for k, c in enumerate(chunks):
        out += ([IMG] if k else []) + c[1:]
    return out


def _llava_v1(sp, turns):
    """LLaVA train.py preprocess_v1 with conv_vicuna_v1 (has_image path): ids, targets."""
    prompt = VICUNA_V1_SYSTEM + " "
    for k, (q, a) in enumerate(turns):
        prompt += f"USER: {q} ASSISTANT: {a}</s>"
    ids = _image_tokenize(sp, prompt)
    target = list(ids)
    cur = 1
    target[0] = -100
    for rou in prompt.split("</s>"):
        if not rou:
            break
        head = rou.split(" ASSISTANT: ")[0] + " ASSISTANT: "
        round_len, instr = len(_image_tokenize(sp, rou)), len(_image_tokenize(sp, head)) - 2
        target[cur:cur + instr] = [-100] * instr
        cur += round_len
    assert cur == len(ids), "tokenization mismatch in the reference itself"
    return ids, [int(t != -100) for t in target]


CONVS = [
    [("<image>\nWhat is in the picture?", "A red cat sitting on a blue mat.")],
    [("Describe the image in detail. <image>", "Two dogs play in the park."),
     ("And the tree?", "It is near the dogs."), ("Sure?", "Yes 100%.")],
    [("What is a lake?", "Water."), ("Blue?", "Often.")],  # text-only: no image tokens
]


@pytest.mark.parametrize("conv", CONVS)
def test_vicuna_v1_equals_llava_preprocess_v1(tok, conv):
    turns = [t for q, a in conv for t in (("human", q), ("gpt", a))]
    n_images = sum("<image>" in q for q, _ in conv)
    segs = render_conversation(normalise_turns([{"from": f, "value": v} for f, v in turns]),
                               n_images, "vicuna_v1")
    moved = [("<image>\n" + q.replace("<image>", "").strip() if "<image>" in q else q, a)
             for q, a in conv]  # preprocess_multimodal moves <image> to the front
    assert _ours(segs, tok) == _llava_v1(tok._sp, moved)


def test_vicuna_v1_hand_checked(tok):
    segs = render_conversation([("user", "<image>\nWhat is it?"), ("assistant", "A cat.")], 1,
                               "vicuna_v1")
    tokens, mask = _ours(segs, tok)
    sp = tok._sp
    assert tokens[0] == 1 and mask[0] == 0 and tokens[-1] == 2 and mask[-1] == 1
    at = tokens.index(IMG)
    assert sp.decode(tokens[1:at]) == VICUNA_V1_SYSTEM + " USER: "
    assert sp.id_to_piece(tokens[at - 1]) == "▁" and sp.id_to_piece(tokens[at + 1]) == "▁"
    assert sp.id_to_piece(tokens[at + 2]) == "<0x0A>"  # "<image>\n" as LLaVA has it
    first = mask.index(1)
    assert sp.decode(tokens[at + 1:first]) == "\nWhat is it? ASSISTANT:"
    assert sp.id_to_piece(tokens[first]) == "▁A" and all(mask[first:])
    assert sp.decode(tokens[first:-1]) == "A cat."


def test_plain_bos_and_text_only(tok):
    tokens, mask = _ours(render_caption("a photo of a lake", 1, "plain_bos"), tok)
    assert tokens[:2] == [1, IMG] and mask[:2] == [0, 0] and all(mask[2:])
    assert tokens[2:] == list(tok._sp.encode("a photo of a lake\n")) and 2 not in tokens
    text_tokens, text_mask = _ours(render_text("a lake", "plain_bos"), tok)
    assert text_tokens == [1] + list(tok._sp.encode("a lake\n")) and text_mask[0] == 0
    assert all(text_mask[1:])
    # EVEv2's plain is unchanged: no BOS
    assert _ours(render_caption("a lake", 1, "plain"), tok)[0][0] == IMG


HAND_SIZES = [  # (W, H) -> base (W, H), grid at ratio 2, grid at ratio 4, teacher valid rows/cols
    ((1000, 333), (336, 112), (8, 24), (16, 48)),
    ((333, 1000), (112, 336), (24, 8), (48, 16)),
    ((50, 40), (336, 280), (20, 24), (40, 48)),
    ((336, 336), (336, 336), (24, 24), (48, 48)),
    ((2000, 20), (336, 14), (1, 24), (2, 48)),
    ((10, 1000), (14, 336), (24, 1), (48, 2)),
    ((1000, 990), (336, 336), (24, 24), (48, 48)),
    ((1000, 290), (336, 98), (7, 24), (14, 48)),
]


@pytest.mark.parametrize("size,base,grid2,grid4", HAND_SIZES)
def test_resize_rule_hand_computed(size, base, grid2, grid4):
    assert rules.base_size(*size) == base
    assert rules.evev1_size(*size, 2) == (base[0] * 2, base[1] * 2)
    assert rules.student_grid(*size, 2) == grid2 and rules.student_grid(*size, 4) == grid4
    assert rules.BLOCK == 28 and all(s % 56 == 0 for s in rules.evev1_size(*size, 4))


TEACHER = [  # base (W, H) -> paste offset (x, y), valid patch rows, valid patch columns
    ((336, 112), (0, 112), range(8, 16), range(24)),
    ((112, 336), (112, 0), range(24), range(8, 16)),
    ((336, 280), (0, 28), range(2, 22), range(24)),
    ((336, 14), (0, 154), range(11, 12), range(24)),
    ((336, 98), (0, 112), range(8, 15), range(24)),
    ((336, 336), (0, 0), range(24), range(24)),
]


@pytest.mark.parametrize("base,offset,rows,cols", TEACHER)
def test_teacher_canvas_and_valid_patches(base, offset, rows, cols):
    assert rules.teacher_offset(*base) == offset
    expected = np.zeros((24, 24), dtype=bool)
    expected[rows.start:rows.stop, cols.start:cols.stop] = True
    assert (rules.teacher_valid(*base).reshape(24, 24) == expected).all()
    img = random_rgb(base[0], base[1], 3)
    canvas = rules.teacher_canvas(img)
    x, y = offset
    assert (canvas[y:y + base[1], x:x + base[0]] == img).all()
    outside = np.ones((336, 336), dtype=bool)
    outside[y:y + base[1], x:x + base[0]] = False
    assert (canvas[outside] == (122, 116, 104)).all() and rules.BACKGROUND == (122, 116, 104)


def test_prepare_evev1_image_resizes_the_original_twice():
    src = Image.fromarray(random_rgb(1000, 333, 5))
    cfg = ImageConfig(encode_format="png")
    student, hp, wp, teacher, tw, th = prepare_evev1_image(encode(src, "PNG"), cfg, 4)
    assert (hp, wp, tw, th) == (16, 48, 336, 112)
    got_s, got_t = (np.asarray(Image.open(io.BytesIO(b))) for b in (student, teacher))
    assert (got_s == np.asarray(src.resize((1344, 448), Image.BICUBIC))).all()
    # the teacher is the ORIGINAL resized, not the student downscaled
    assert (got_t == np.asarray(src.resize((336, 112), Image.BICUBIC))).all()
