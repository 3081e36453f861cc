"""Templates, loss masks and tokenisation with tiny tokenizers trained here."""

import numpy as np
import pytest

from eve_megatron.data.indexed import StoredImage, StoredSample
from eve_megatron.data.dataset import build_row
from eve_megatron.data.templates import (QWEN2_SYSTEM, Segment, TemplateError, normalise_turns,
                                         render_caption, render_conversation, render_text,
                                         tokenize_segments)
from eve_megatron.data.tokenizer import load_tokenizer
from tests.unit._data_helpers import make_hf_tokenizer, make_sp_tokenizer, png_bytes


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return load_tokenizer(make_hf_tokenizer(str(tmp_path_factory.mktemp("hf"))))


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return load_tokenizer(make_sp_tokenizer(str(tmp_path_factory.mktemp("sp"))))


CONV = [{"from": "human", "value": "Describe this.\n<image>"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Red."}]


def _flat(segments):
    return "".join("<image>" if s.image >= 0 else s.text for s in segments)


def _supervised(segments):
    return [s.text for s in segments if s.supervised]


def test_qwen2_template_exact_text_and_mask():
    seg = render_conversation(normalise_turns(CONV), 1, "qwen2")
    assert _flat(seg) == (f"{QWEN2_SYSTEM} USER: <image>\nDescribe this. ASSISTANT: A cat.<|im_end|>"
                          "USER: Color? ASSISTANT: Red.<|im_end|>")
    assert _supervised(seg) == [" A cat.<|im_end|>", " Red.<|im_end|>"]


def test_chatml_template_exact_text_and_mask():
    seg = render_conversation(normalise_turns(CONV), 1, "chatml", system_prompt="Be brief.")
    assert _flat(seg) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\n"
                          "Describe this.<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
                          "<|im_start|>user\nColor?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n")
    assert _supervised(seg) == ["A cat.<|im_end|>", "Red.<|im_end|>"]


def test_plain_caption_and_text():
    seg = render_caption("  a red cat ", 1, "plain")
    assert seg == [Segment(image=0), Segment("a red cat\n", True)]
    assert render_text("hello") == [Segment("hello\n", True)]


def test_images_moved_to_front_in_order_and_default_placement():
    turns = normalise_turns([{"from": "human", "value": "A <image> and B <image>"},
                             {"from": "gpt", "value": "ok"}])
    seg = render_conversation(turns, 2, "qwen2")
    assert [s.image for s in seg if s.image >= 0] == [0, 1]
    assert "USER: <image>\n<image>\nA  and B ASSISTANT:" in _flat(seg)
    no_marker = normalise_turns([{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}])
    assert "USER: <image>\nWhat? ASSISTANT:" in _flat(render_conversation(no_marker, 1, "qwen2"))


@pytest.mark.parametrize("conv,n,reason", [
    ([], 0, "empty_conversation"),
    ([{"from": "human", "value": "hi"}], 0, "empty_conversation"),
    ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}], 0, "bad_conversation"),
    ([{"from": "human"}], 0, "missing_field"),
    ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], 1,
     "image_count_mismatch"),
])
def test_bad_conversations(conv, n, reason):
    with pytest.raises(TemplateError) as err:
        render_conversation(normalise_turns(conv), n, "qwen2")
    assert err.value.reason == reason


@pytest.mark.parametrize("tok_name", ["hf_tok", "sp_tok"])
def test_tokenized_mask_matches_segments(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    assert tok.token_id("<|im_end|>") is not None
    seg = render_conversation(normalise_turns(CONV), 1, "qwen2")
    tokens, mask, pos = tokenize_segments(seg, tok)
    assert len(tokens) == len(mask) and len(pos) == 1
    want_tokens, want_mask = [], []
    for s in seg:
        if s.image >= 0:
            assert pos[0] == len(want_tokens)
            continue
        ids = tok.encode(s.text)
        want_tokens += ids
        want_mask += [int(s.supervised)] * len(ids)
    assert tokens == want_tokens and mask == want_mask
    im_end = tok.token_id("<|im_end|>")
    sup = [t for t, m in zip(tokens, mask) if m]
    assert sup.count(im_end) == 2 and tokens.count(im_end) == 2
    if tok_name == "hf_tok":  # byte-level BPE round-trips exactly
        assert tok.decode(sup) == " A cat.<|im_end|> Red.<|im_end|>"


def test_labels_follow_supervision_with_image_spliced(hf_tok):
    seg = render_caption("a red cat", 1, "plain")
    tokens, mask, pos = tokenize_segments(seg, hf_tok)
    image = StoredImage(png_bytes(64, 32, 0), 1, 2, pos[0])
    sample = StoredSample(np.array(tokens), np.array(mask, dtype=np.uint8), [image])
    row = build_row([sample], 32)
    n_img = image.num_tokens
    assert n_img == 4 and row["is_vision"][:n_img].all() and not row["is_vision"][n_img:].any()
    labels = row["labels"].tolist()
    # the last image token predicts the first caption token; the caption's last token predicts nothing
    assert labels[n_img - 1] == tokens[0]
    assert labels[n_img:n_img + len(tokens) - 1] == tokens[1:]
    assert all(v == -100 for v in labels[:n_img - 1] + labels[n_img + len(tokens) - 1:])
