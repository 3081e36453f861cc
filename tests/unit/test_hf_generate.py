"""``generate`` on a real export, on whichever transformers release is installed (CI runs
these at both ends of the tested range): with a cache == by full recomputation, every
decoding mode, image placeholders, loud errors. fp32 throughout."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.unit.conftest import load_eve

STEPS = 14


@pytest.fixture(scope="module")
def eve(eve_export):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(eve_export["dir"], trust_remote_code=True)
    return load_eve(eve_export["dir"]), processor


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _chat(processor, question, n_images=1):
    parts = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": parts}])


@torch.no_grad()
def _recompute(model, ids, pixel_values, steps):
    """Greedy by full recomputation: the whole sequence (images included) every step, no cache."""
    seq = ids
    for _ in range(steps):
        logits = model(input_ids=seq, pixel_values=pixel_values, use_cache=False).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, ids.shape[1]:]


def _greedy(model, inputs, **kw):
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, pad_token_id=0, **kw)
    return out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("with_image", [True, False])
def test_cached_greedy_equals_full_recomputation(eve, with_image):
    model, processor = eve
    text = _chat(processor, "What is in the picture?", int(with_image))
    inputs = processor(text=text, images=[_image(50, 37, 1)] if with_image else None)
    pixels = [inputs["pixel_values"][0, 0]] if with_image else None
    expected = _recompute(model, inputs["input_ids"], pixels, STEPS)
    assert len(set(expected[0].tolist())) > 2, "a degenerate answer would hide cache bugs"
    assert torch.equal(_greedy(model, inputs), expected)
    assert torch.equal(_greedy(model, inputs, use_cache=False), expected)
    assert torch.equal(_greedy(model, inputs, cache_implementation="static"), expected)


def test_batch_of_different_image_sizes_left_padded_equals_one_by_one(eve):
    model, processor = eve
    images = [_image(50, 37, 2), _image(30, 90, 3)]
    texts = [_chat(processor, "What is in the picture?"), _chat(processor, "Describe it.")]
    batch = processor(text=texts, images=images)
    assert batch["attention_mask"][:, 0].tolist().count(0) == 1  # one row is left-padded
    got = _greedy(model, batch)
    for row, (text, image) in enumerate(zip(texts, images)):
        alone = _greedy(model, processor(text=text, images=image))
        assert torch.equal(got[row], alone[0]), row
    # the list form of pixel_values (span order, sizes differ) gives the same answers
    listed = [batch["pixel_values"][b, 0, :, :h, :w] for b, (h, w) in enumerate(
        batch["image_sizes"][:, 0].tolist())]
    assert torch.equal(_greedy(model, {"input_ids": batch["input_ids"],
                                       "attention_mask": batch["attention_mask"],
                                       "pixel_values": listed}), got)


def test_beam_search_and_return_sequences_carry_each_rows_images(eve):
    model, processor = eve
    images = [_image(50, 37, 4), _image(90, 30, 5)]
    batch = processor(text=[_chat(processor, "What is this?")] * 2, images=images)
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, pad_token_id=0,
              do_sample=False, early_stopping=True)
    beams = model.generate(**batch, **kw)
    assert beams.shape[0] == 4
    uncached = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(beams, uncached)
    first = model.generate(**processor(text=_chat(processor, "What is this?"), images=images[0]), **kw)
    assert torch.equal(beams[:2, -first.shape[1]:], first)  # row 0 is not row 1's image


def test_sampling_and_prompt_lookup(eve):
    model, processor = eve
    inputs = processor(text=_chat(processor, "a photo of a mountain lake a photo of a"),
                       images=_image(64, 64, 6))
    kw = dict(do_sample=True, top_k=20, max_new_tokens=10, pad_token_id=0, num_return_sequences=2)
    torch.manual_seed(0)
    cached = model.generate(**inputs, **kw)
    torch.manual_seed(0)
    assert torch.equal(cached, model.generate(**inputs, use_cache=False, **kw))
    # prompt lookup copies n-grams of the prompt (image placeholders included) as candidates;
    # for greedy decoding it must change nothing
    looked_up = model.generate(**inputs, prompt_lookup_num_tokens=4, max_matching_ngram_size=2,
                               max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    assert torch.equal(looked_up[:, inputs["input_ids"].shape[1]:], _greedy(model, inputs))


def test_labels_and_decoding_of_a_full_output(eve):
    model, processor = eve
    inputs = processor(text=_chat(processor, "What is in the picture?"), images=_image(40, 40, 7))
    ids = inputs["input_ids"]
    out = model(**inputs, labels=ids.clone())
    logits, target = out.logits[0, :-1], ids[0, 1:]
    keep = target >= 0  # image positions are never targets
    assert keep.sum() < len(keep)
    expected = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert torch.allclose(out.loss, expected, rtol=1e-6)
    full = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    text = processor.batch_decode(full, skip_special_tokens=True)[0]
    assert text.startswith("A chat between") and "-200" not in text
    assert processor.decode(full[0]) == text or "<|" in processor.decode(full[0])


def test_inputs_embeds_need_the_vision_mask(eve):
    model, processor = eve
    inputs = processor(text=_chat(processor, "What is in the picture?"), images=_image(40, 60, 8))
    embeds, vision_mask = model.model.embed(inputs["input_ids"], inputs["pixel_values"],
                                            inputs["image_sizes"])
    with pytest.raises(ValueError, match="vision_mask"):
        model(inputs_embeds=embeds)
    with torch.no_grad():
        by_ids = model(**inputs).logits
        by_embeds = model(inputs_embeds=embeds, vision_mask=vision_mask).logits
    assert torch.allclose(by_ids, by_embeds, atol=1e-5)
    with pytest.raises(ValueError, match="vision_mask"):
        model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                       max_new_tokens=2, pad_token_id=0)
    new = model.generate(inputs_embeds=embeds, vision_mask=vision_mask,
                         attention_mask=inputs["attention_mask"], max_new_tokens=STEPS,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(new[:, -STEPS:], _greedy(model, inputs))


def test_errors_are_loud(eve):
    model, processor = eve
    inputs = processor(text=_chat(processor, "What?"), images=_image(40, 40, 9))
    n = inputs["input_ids"].shape[1]
    step = torch.tensor([[5]])
    with pytest.raises(ValueError, match="cache holds 0 positions"):  # a decoding step without its cache
        model(input_ids=step, attention_mask=torch.ones(1, n + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="cache of the earlier positions"):  # same, mask dropped
        model(input_ids=step, position_ids=torch.tensor([[n]]))
    with pytest.raises(TypeError, match="unexpected keyword"):
        model(**inputs, not_an_argument=1)
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(TypeError, match="Cache"):
        model(**inputs, past_key_values=((torch.zeros(1),),))
