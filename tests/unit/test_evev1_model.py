"""EVEv1Model (Megatron-Core decoder + PEL + PAL) equals the plain EVEv1 reference on packed
rows with images of several sizes and text-only samples: logits, token loss, PAL loss and
every gradient (fp32, relative error <= 1e-5), at 672-like and HD (2x2 pooled) sizes."""

import dataclasses

import pytest

import torch
import torch.nn.functional as F

from eve_megatron.hf.mapping import Heads, hf_to_megatron
from eve_megatron.models.eve.patch_embedding import images_to_blocks
from eve_megatron.models.evev1 import EVEv1Model, evev1_config
from tests.reference_evev1 import EVEv1Shape, forward, make_batch, random_weights
from tests.unit.test_evev1_pel import _ours_from

SHAPE = EVEv1Shape()
TOL = 1e-5


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _megatron_weights(model, w):
    """Our parameters from the reference's released names (Llama table for the decoder)."""
    heads = Heads(SHAPE.heads, SHAPE.heads, SHAPE.head_dim)
    pel = {f"embedding.patch_embedding.{k}": v for k, v in _ours_from(w).items()}
    comp = "model.vision_tower_compressor."
    out = {}
    for name, param in model.named_parameters():
        if name.startswith("teacher."):  # frozen, not in the reference: its own weights
            out[name] = param.detach().clone()
        elif name in pel:
            out[name] = pel[name]
        elif name.startswith("pal."):
            out[name] = w[comp + name[len("pal."):]]
        else:
            out[name] = hf_to_megatron(name, lambda n: w[n], heads)
    return out


def _contract(batch, shape):
    """The reference batch in our batch contract (images cropped to their valid region)."""
    crops = []
    for canvas in batch["images"]:
        rows, cols = canvas[3].any(1).nonzero()[:, 0], canvas[3].any(0).nonzero()[:, 0]
        crops.append(canvas[:3, int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1])
    pixels, grid = images_to_blocks(crops, block=shape.patch * shape.conv_stride)
    seg = batch["segment_ids"]
    lens = []
    for r in range(seg.shape[0]):
        _, counts = torch.unique_consecutive(seg[r], return_counts=True)
        lens += counts.tolist()
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return {"tokens": batch["tokens"], "position_ids": batch["position_ids"],
            "is_vision": batch["is_vision"], "cu_seqlens": cu, "max_seqlen": max(lens),
            "pixel_values": pixels, "image_grid_hw": grid}


def config_of(shape, **overrides):
    """The EVEv1Config of a reference shape."""
    cfg = evev1_config("evev1-tiny", num_layers=shape.layers, hidden_size=shape.hidden,
                       num_attention_heads=shape.heads, num_query_groups=shape.heads,
                       ffn_hidden_size=shape.ffn, vocab_size=shape.vocab,
                       vision_hidden_size=shape.mm_hidden, pel_num_attention_heads=shape.pel_heads,
                       teacher_hidden_size=shape.teacher_hidden, pal_num_attention_heads=shape.pal_heads,
                       pal_layer_stride=shape.layers - shape.pal_layers[1],
                       teacher_image_size=shape.teacher_image_size, **overrides)
    assert cfg.pal_taps == shape.pal_layers
    return cfg


def _model(shape, w):
    model = EVEv1Model(config_of(shape))
    model.load_state_dict({k: v.clone() for k, v in _megatron_weights(model, w).items()}, strict=True)
    return model


@pytest.mark.parametrize("hd", [False, True])
def test_evev1_model_matches_reference(megatron_world, hd):
    shape = dataclasses.replace(SHAPE, image_size=224) if hd else SHAPE
    w = random_weights(shape, seed=7)
    model = _model(shape, w)
    grids = [(2, 3), None, (4, 4), (1, 1), None, (3, 2)]
    batch = make_batch(shape, grids, rows=2 if not hd else 3, seq=96 if not hd else 128,
                       seed=2, hd=hd)
    ref_w = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    ref = forward(ref_w, batch, shape, hd=hd)
    inputs = _contract(batch, shape)
    assert _rel(model(**inputs), ref["logits"]) <= TOL
    per_token, pal_sum, n_images = model(**inputs, labels=batch["labels"],
                                         teacher_features=batch["teacher_feats"],
                                         teacher_valid=batch["teacher_valid"])
    supervised = batch["labels"] != -100
    ce = per_token.sum() / supervised.sum()
    assert n_images == 4 and abs(float(ce) - float(ref["ce"])) <= TOL * float(ref["ce"])
    assert abs(float(pal_sum / n_images) - float(ref["pal"])) <= TOL * float(ref["pal"])
    (ce + pal_sum / n_images).backward()
    ref["loss"].backward()
    ref_grads = _megatron_weights(model, {k: v.grad for k, v in ref_w.items()})
    worst = max((_rel(p.grad, ref_grads[n]), n) for n, p in model.named_parameters()
                if p.requires_grad)
    assert worst[0] <= TOL, worst
    assert all(p.grad is None for p in model.teacher.parameters())  # frozen


def test_a_text_only_batch_keeps_every_pal_weight_in_the_graph(megatron_world):
    w = random_weights(SHAPE, seed=1)
    model = _model(SHAPE, w)
    batch = make_batch(SHAPE, [None, None], rows=1, seq=32, seed=3)
    per_token, pal_sum, n = model(**_contract(batch, SHAPE), labels=batch["labels"],
                                  teacher_features=batch["teacher_feats"],
                                  teacher_valid=batch["teacher_valid"])
    assert n == 0 and float(pal_sum) == 0.0
    (per_token.sum() + pal_sum).backward()
    for name, p in model.named_parameters():
        if name.startswith("teacher."):
            continue
        assert p.grad is not None, name
        if name.startswith(("pal.", "embedding.patch_embedding.")):
            assert not p.grad.any(), name


def test_checkpoint_round_trip_rebuilds_the_family(megatron_world, tmp_path):
    from eve_megatron.models.eve.config import config_from_fields, model_class
    from eve_megatron.training import checkpointing

    torch.manual_seed(0)
    model = EVEv1Model(config_of(SHAPE))
    checkpointing.save_checkpoint(str(tmp_path), 1, [model])
    fields = checkpointing.read_model_fields(str(tmp_path))
    assert fields["family"] == "evev1" and fields["teacher_num_layers"] == 3
    cfg = config_from_fields(fields)
    torch.manual_seed(1)
    again = model_class(cfg)(cfg)
    assert type(again) is EVEv1Model
    checkpointing.load_checkpoint(str(tmp_path), [again])
    theirs = dict(again.named_parameters())
    for name, p in model.named_parameters():  # PEL, decoder, PAL and the frozen teacher
        assert torch.equal(p, theirs[name]), name
    assert any(n.startswith("teacher.") for n in theirs)
