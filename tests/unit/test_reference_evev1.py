"""Checks of the plain-PyTorch EVEv1 reference (tests/reference_evev1.py) against facts of
../shared/docs/evev1_reference.md, computed here by other routes (closed forms, cropping by hand,
HF's LlamaForCausalLM for the decoder)."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tests.reference_evev1 import (COMP, VT, EVEv1Shape, decoder_forward, forward, global_attention,
                                   local_attention, make_batch, pal_loss, pal_outputs, pel_forward, pel_tokens,
                                   random_weights, teacher_valid_from_mask, weight_shapes)

SHAPE = EVEv1Shape()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: a second intra-op thread only spins on a shared 2-core box (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def w():
    return random_weights(SHAPE, seed=3)


def _canvas(gh, gw, oy, ox, shape=SHAPE, unit=14, seed=0):
    """A [4, S, S] canvas: random pixels in a gh x gw block region (of ``unit`` px) at (oy, ox)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.zeros(4, shape.image_size, shape.image_size)
    ys, xs = slice(oy * unit, (oy + gh) * unit), slice(ox * unit, (ox + gw) * unit)
    c[:3, ys, xs] = torch.randn(3, gh * unit, gw * unit, generator=g)
    c[3, ys, xs] = 1
    return c


@pytest.mark.parametrize("gh,gw", [(1, 1), (1, 4), (4, 1), (2, 3), (4, 4), (3, 2)])
def test_token_count(w, gh, gw):
    """§1 step 5: N = 1 + h(w+1), h x w = the valid region in 28-px windows."""
    tok, hw = pel_forward(w, _canvas(gh, gw, 0, 4 - gw, unit=28), None, SHAPE)
    assert hw == (gh, gw) and tok.shape == (1 + gh * (gw + 1), SHAPE.hidden)


def test_layout_cls_rows_split(w):
    """§1 step 5: cls first, then each row of the grid followed by split_embedding (row-major)."""
    c = _canvas(2, 3, 1, 0, unit=28, seed=4)
    tok, (h, wd) = pel_tokens(w, c, None, SHAPE)
    feat = F.conv2d(c[None, :3], w[VT + "patch_embedding.weight"], stride=14)[0, :, 2:6, 0:6]
    grid, _ = local_attention(w, feat, SHAPE)
    assert (h, wd) == (2, 3)
    torch.testing.assert_close(tok[0], global_attention(w, grid, SHAPE))
    for r in range(h):
        torch.testing.assert_close(tok[1 + r * (wd + 1):1 + r * (wd + 1) + wd], grid[r * wd:(r + 1) * wd])
        assert torch.equal(tok[1 + r * (wd + 1) + wd], w[VT + "split_embedding"])


def test_pal_reads_only_patch_positions(w):
    """§2 Student: the cls and split positions never reach the PAL; every patch position does."""
    hs = [torch.randn(1, 12, SHAPE.hidden) for _ in range(SHAPE.layers + 1)]
    span = [(0, 2, 2, 3)]  # cls at 2; rows at 3..5 (+split 6) and 7..9 (+split 10)
    base = pal_outputs(w, hs, span, SHAPE)[0]
    for pos, used in [(2, False), (6, False), (10, False), (11, False), (1, False), (3, True), (9, True)]:
        hs2 = [t.clone() for t in hs]
        hs2[0][0, pos] += 1.0
        assert (not torch.equal(pal_outputs(w, hs2, span, SHAPE)[0], base)) == used, pos


def test_empty_and_odd_crops(w):
    """No valid patch: [:16, :16] (clamped to the 8x8 tiny canvas -> 4x4); an odd 3x5 patch
    crop floors to 1x2 windows; a mask cutting a patch is refused."""
    assert pel_forward(w, _canvas(0, 0, 0, 0), None, SHAPE)[1] == (4, 4)
    assert pel_forward(w, _canvas(3, 5, 1, 2), None, SHAPE)[1] == (1, 2)
    bad = _canvas(2, 2, 0, 0)
    bad[3, 0, 0] = 0
    with pytest.raises(AssertionError):
        pel_forward(w, bad, None, SHAPE)


def test_crop_equals_cropped_image(w):
    """§1 step 2: the padded canvas gives exactly what the valid region alone gives."""
    c = _canvas(4, 6, 1, 2, seed=5)  # 14-px aligned, not 28-px aligned
    img = c[:3, 14:14 + 56, 28:28 + 84]
    a, hw = pel_forward(w, c, None, SHAPE)
    b, hw2 = pel_forward(w, img, torch.ones(56, 84), SHAPE)
    assert hw == hw2 == (2, 3)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    full, _ = pel_forward(w, c[:3], torch.ones(112, 112), SHAPE)  # no crop: other tokens
    assert full.shape[0] == 1 + 4 * 5


def test_global_attention_one_patch(w):
    """§1 step 4: one key -> softmax 1 -> cls = class_embedding + proj(v(x))."""
    x = torch.randn(1, SHAPE.mm_hidden)
    C, p = SHAPE.mm_hidden, VT + "global_attention."
    v = F.layer_norm(x, (C,), w[p + "kv.0.weight"], w[p + "kv.0.bias"]) @ w[p + "kv.1.weight"][C:].t()
    want = w[VT + "class_embedding"] + v[0] @ w[p + "proj.weight"].t() + w[p + "proj.bias"]
    torch.testing.assert_close(global_attention(w, x, SHAPE), want, rtol=1e-6, atol=1e-6)


def _two_key_attend(q, k1, k2, v1, v2, heads, scale):
    """Softmax over two keys per head written as a sigmoid: a = sigma(scale q.(k1 - k2))."""
    d = q.shape[-1] // heads
    q, k1, k2, v1, v2 = (t.reshape(heads, d) for t in (q, k1, k2, v1, v2))
    a = torch.sigmoid(scale * (q * (k1 - k2)).sum(-1, keepdim=True))
    return (a * v1 + (1 - a) * v2).reshape(-1)


def test_global_attention_two_patches(w):
    """§1 step 4: 8 heads of C/8, scale C^-0.5 (not head_dim^-0.5), k and v halves of kv.1."""
    C, p = SHAPE.mm_hidden, VT + "global_attention."
    x = torch.randn(2, C) * 3
    cls = w[VT + "class_embedding"]
    q = F.layer_norm(cls, (C,), w[p + "q.0.weight"], w[p + "q.0.bias"]) @ w[p + "q.1.weight"].t()
    kv = F.layer_norm(x, (C,), w[p + "kv.0.weight"], w[p + "kv.0.bias"]) @ w[p + "kv.1.weight"].t()
    agg = _two_key_attend(q, kv[0, :C], kv[1, :C], kv[0, C:], kv[1, C:], 8, C ** -0.5)
    want = cls + agg @ w[p + "proj.weight"].t() + w[p + "proj.bias"]
    torch.testing.assert_close(global_attention(w, x, SHAPE), want, rtol=1e-5, atol=1e-6)


def test_pal_head_three_taps():
    """§2 Heads with taps [4, 2, 0]: query norm_layer[0](hs4), keys = values = norm_layer[1](hs2),
    norm_layer[2](hs0); 8 heads, scale C_t^-0.5; out = input_layer(hs4) + output_layer(fused)."""
    shape = EVEv1Shape(pal_layer_rate=2)
    w = random_weights(shape, seed=9)
    assert shape.pal_layers == [4, 2, 0]
    hs = [torch.randn(1, 6, shape.hidden) for _ in range(5)]
    out = pal_outputs(w, hs, [(0, 1, 1, 1)], shape)[0][0]  # one patch: position 2
    H, c = shape.hidden, COMP + "norm_layer."
    proj = [F.layer_norm(hs[l][0, 2], (H,), w[f"{c}{j}.0.weight"], w[f"{c}{j}.0.bias"])
            @ w[f"{c}{j}.1.weight"].t() for j, l in enumerate([4, 2, 0])]
    fused = _two_key_attend(proj[0], proj[1], proj[2], proj[1], proj[2], 8, shape.teacher_hidden ** -0.5)
    want = (hs[4][0, 2] @ w[COMP + "input_layer.weight"].t() + w[COMP + "input_layer.bias"]
            + fused @ w[COMP + "output_layer.weight"].t() + w[COMP + "output_layer.bias"])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_local_attention_two_row_windows(w):
    """§1 step 3: windows whose top row is a, bottom row b -> q from the pool (a+b)/2, a
    two-key softmax (scale C^-0.5); out = pool + proj(agg), windows row-major (h, w)."""
    C, p = SHAPE.mm_hidden, VT + "local_attention."
    a, b = torch.randn(2, 3, C) * 3, torch.randn(2, 3, C) * 3
    x = torch.stack([a, b], 1).reshape(4, 3, C).repeat_interleave(2, 1).permute(2, 0, 1)  # [C, 4, 6]
    out, hw = local_attention(w, x, SHAPE)
    assert hw == (2, 3)
    ln = lambda t, n: F.layer_norm(t, (C,), w[p + n + ".0.weight"], w[p + n + ".0.bias"])  # noqa: E731
    pool = (a + b) / 2
    q = ln(pool, "q") @ w[p + "q.1.weight"].t()
    ka, kb = ln(a, "kv") @ w[p + "kv.1.weight"].t(), ln(b, "kv") @ w[p + "kv.1.weight"].t()
    for n in range(6):
        i, j = divmod(n, 3)
        agg = _two_key_attend(q[i, j], ka[i, j, :C], kb[i, j, :C], ka[i, j, C:], kb[i, j, C:], 8, C ** -0.5)
        want = pool[i, j] + agg @ w[p + "proj.weight"].t() + w[p + "proj.bias"]
        torch.testing.assert_close(out[n], want, rtol=1e-5, atol=1e-5)


def _expected_shapes(s, C, H, T, V, Fn, J):
    out = {VT + "patch_embedding.weight": (C, 3, 14, 14), VT + "class_embedding": (C,),
           VT + "split_embedding": (C,), "model.mm_projector.0.weight": (H, C),
           "model.mm_projector.0.bias": (H,), "model.mm_projector.2.weight": (H, H),
           "model.mm_projector.2.bias": (H,), COMP + "input_layer.weight": (T, H),
           COMP + "input_layer.bias": (T,), COMP + "output_layer.weight": (T, T),
           COMP + "output_layer.bias": (T,), "model.embed_tokens.weight": (V, H),
           "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for a in ("local", "global"):
        for part, shp in [("q.0.weight", (C,)), ("q.0.bias", (C,)), ("kv.0.weight", (C,)),
                          ("kv.0.bias", (C,)), ("q.1.weight", (C, C)), ("kv.1.weight", (2 * C, C)),
                          ("proj.weight", (C, C)), ("proj.bias", (C,))]:
            out[f"{VT}{a}_attention.{part}"] = shp
    for j in range(J):
        out.update({f"{COMP}norm_layer.{j}.0.weight": (H,), f"{COMP}norm_layer.{j}.0.bias": (H,),
                    f"{COMP}norm_layer.{j}.1.weight": (T, H)})
    for i in range(s.layers):
        m = f"model.layers.{i}."
        out.update({m + "input_layernorm.weight": (H,), m + "post_attention_layernorm.weight": (H,),
                    m + "self_attn.q_proj.weight": (H, H), m + "self_attn.k_proj.weight": (H, H),
                    m + "self_attn.v_proj.weight": (H, H), m + "self_attn.o_proj.weight": (H, H),
                    m + "mlp.gate_proj.weight": (Fn, H), m + "mlp.up_proj.weight": (Fn, H),
                    m + "mlp.down_proj.weight": (H, Fn)})
    return out


def test_weight_names_and_shapes(w):
    """§4 table at the released sizes (and the doc's ~43M PAL, 6.74B LLM), and scaled to tiny."""
    big = EVEv1Shape.evev1_7b()
    assert big.pal_layers == [32, 28, 24, 20, 16, 12, 8, 4, 0] and SHAPE.pal_layers == [4, 3, 2, 1, 0]
    shapes = weight_shapes(big)
    assert shapes == _expected_shapes(big, 1024, 4096, 1024, 32000, 11008, 9)
    n = lambda pre: sum(math.prod(v) for k, v in shapes.items() if k.startswith(pre))  # noqa: E731
    assert round(n(COMP) / 1e6) == 43
    llm = sum(math.prod(v) for k, v in shapes.items() if "vision" not in k and "mm_proj" not in k)
    assert round(llm / 1e7) == 674
    assert {k: tuple(v.shape) for k, v in w.items()} == _expected_shapes(SHAPE, 32, 64, 32, 256, 128, 5)
    assert all(bool((v != 0).all()) for v in w.values())
    norms = [v for k, v in w.items() if k.endswith("norm.weight") or k.endswith("layernorm.weight")]
    assert all(0.5 < float(v.mean()) < 1.5 for v in norms)


def test_decoder_matches_hf_llama(w):
    """§1 LLM: logits and hs[0..L] (hs[L] after the final norm) equal HF's Llama."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=SHAPE.vocab, hidden_size=SHAPE.hidden,
                                   intermediate_size=SHAPE.ffn, num_hidden_layers=SHAPE.layers,
                                   num_attention_heads=SHAPE.heads, num_key_value_heads=SHAPE.heads,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
                                   mlp_bias=False, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    dec = {k: v for k, v in w.items() if k.startswith(("model.layers", "model.norm", "model.embed", "lm_head"))}
    missing, unexpected = hf.load_state_dict(dec, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    tokens = torch.randint(0, SHAPE.vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
    pos = torch.arange(24).expand(2, 24)
    logits, hs = decoder_forward(w, w["model.embed_tokens.weight"][tokens], pos, torch.zeros_like(tokens), SHAPE)
    assert len(hs) == len(out.hidden_states) == SHAPE.layers + 1
    for a, b in zip(hs, out.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)


def test_packing_equals_separate_runs(w):
    """§1 Positions and mask: a sample packed second in a row equals the sample alone."""
    e = torch.randn(1, 20, SHAPE.hidden)
    pos = torch.cat([torch.arange(8), torch.arange(12)])[None]
    seg = torch.tensor([[0] * 8 + [1] * 12])
    packed, _ = decoder_forward(w, e, pos, seg, SHAPE)
    alone, _ = decoder_forward(w, e[:, 8:], torch.arange(12)[None], torch.zeros(1, 12, dtype=torch.long), SHAPE)
    torch.testing.assert_close(packed[:, 8:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hd", [False, True])
def test_pal_zero_when_aligned_and_bounded(w, hd):
    """§2: PAL = 0 when each student output is a positive multiple of its teacher feature, in
    (0, 2] for random teachers; the loss is their mean over images; HD pools 2x2."""
    shape = replace(SHAPE, image_size=224) if hd else SHAPE
    b = make_batch(shape, [(2, 3), None, (4, 1), (1, 1)], rows=2, seq=60 if hd else 40, seed=7, hd=hd)
    out = forward(w, b, shape, hd=hd)
    assert [s[2:] for s in out["spans"]] == ([(4, 6), (8, 2), (2, 2)] if hd else [(2, 3), (4, 1), (1, 1)])
    assert 0 < float(out["pal"]) <= 2
    stud = pal_outputs(w, out["hs"], out["spans"], shape, hd)
    teach = b["teacher_feats"].clone()
    for i, o in enumerate(stud):
        teach[i][b["teacher_valid"][i]] = o.detach() * (i + 0.5)
    hs, spans = out["hs"], out["spans"]
    assert abs(float(pal_loss(w, hs, spans, teach, b["teacher_valid"], shape, hd))) < 1e-6
    teach[1][b["teacher_valid"][1]] *= -1  # image 1 opposite: loss 2, mean over 3 images
    torch.testing.assert_close(float(pal_loss(w, hs, spans, teach, b["teacher_valid"], shape, hd)), 2 / 3)


def test_text_only_zero_gradient(w):
    """§2 Loss: text-only rows add 0 with zero gradient and do not count as images."""
    b = make_batch(SHAPE, [(2, 2), None, None], rows=1, seq=40, seed=2)
    wr = {k: v.clone().requires_grad_() for k, v in w.items()}
    hs = forward(wr, b, SHAPE)["hs"]
    spans, tf, tv = [(0, 1, 2, 2)], b["teacher_feats"], b["teacher_valid"]
    text = pal_loss(wr, hs, [], tf[:0], tv[:0], SHAPE, text_spans=b["text_spans"])
    assert len(b["text_spans"]) == 2 and abs(float(text.detach())) < 1e-6
    gt = torch.autograd.grad(text, [wr[COMP + "input_layer.weight"], hs[2]], retain_graph=True)
    assert max(float(g.abs().max()) for g in gt) < 1e-6
    ps = [wr[COMP + "input_layer.weight"], wr[VT + "class_embedding"], hs[2]]
    alone = pal_loss(wr, hs, spans, tf, tv, SHAPE)
    mixed = pal_loss(wr, hs, spans, tf, tv, SHAPE, text_spans=b["text_spans"])
    torch.testing.assert_close(mixed, alone)
    for a, m in zip(torch.autograd.grad(alone, ps, retain_graph=True), torch.autograd.grad(mixed, ps)):
        torch.testing.assert_close(m, a, rtol=1e-5, atol=1e-7)


def test_total_loss_and_every_weight_trained(w):
    """§2 Loss: total = CE (mean over non-ignored) + 1.0 x PAL; every weight gets a gradient."""
    b = make_batch(SHAPE, [(2, 3), None, (1, 4), (3, 3)], rows=2, seq=48, seed=11)
    wr = {k: v.clone().requires_grad_() for k, v in w.items()}
    out = forward(wr, b, SHAPE)
    keep = b["labels"] != -100
    ce = -(out["logits"].log_softmax(-1).gather(-1, b["labels"].clamp(min=0)[..., None])[..., 0])[keep].mean()
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["loss"], ce + out["pal"])
    out["loss"].backward()
    assert all(v.grad is not None and bool(v.grad.abs().sum() > 0) for v in wr.values())


def test_teacher_valid_from_mask():
    """§2 Teacher: 336 mask pooled by 14 -> 24x24 valid patches; a mask cutting a patch fails."""
    m = torch.zeros(336, 336)
    m[28:308, 56:280] = 1
    v = teacher_valid_from_mask(m)
    assert v.shape == (576,) and int(v.sum()) == 20 * 16 and bool(v.view(24, 24)[2, 4])
    m[28, 56] = 0
    with pytest.raises(AssertionError):
        teacher_valid_from_mask(m)
