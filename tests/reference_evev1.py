"""A plain single-process PyTorch reference of the EVEv1 forward (PEL, projector, Llama decoder,
PAL loss), independent of eve_megatron (it imports nothing from it).

Written from ../shared/docs/evev1_reference.md ("the doc", sections cited as §n). Where the doc
is silent, the choice is stated; the PEL/PAL ones were checked against the official file the
doc cites (baaivision/EVE ``EVEv1/eve/model/multimodal_encoder/vision_tokenizer.py``):
- LayerNorm eps 1e-5 (``nn.LayerNorm`` default); ``kv.1`` output = [k | v], each split into
  heads as contiguous chunks of ``width // heads``; heads concatenated back in order.
- GELU exact (erf), [inferred]: LLaVA's ``mlp2x_gelu`` builder uses ``nn.GELU()``.
- A pooled mask must be 0 or 1 per patch (the official code asserts it); valid = pooled > 0.
- Taps: ``layer_idx = L - arange(0, L + 1, rate)``, rate = ``pal_layer_rate`` or by default
  ``max(1, L // 8)``: the released rate 4 at L = 32 ([32, 28, ..., 0], 9 heads); L = 4 gives rate
  1 ([4, 3, 2, 1, 0], 5 heads). One ``norm_layer`` per tap; the first tap is always hs[L].
- Text-only samples: the PAL head runs on the first ``min(n, 1 + h0 (w0 + 1))`` positions of the
  sample (h0 = w0 = the empty-crop grid) and adds ``1 - cos(x, x.detach())`` (value ~0, grad 0).
- Labels are already shifted (``labels[t]`` is the target of ``logits[t]``), -100 ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

VT, COMP = "model.vision_tower.", "model.vision_tower_compressor."


@dataclass
class EVEv1Shape:
    """Sizes of the model the reference builds (defaults: tiny; ``evev1_7b()``: released)."""

    layers: int = 4
    hidden: int = 64
    heads: int = 4                 # MHA: kv heads = heads (§1 LLM)
    ffn: int = 128
    vocab: int = 256
    eps: float = 1e-5              # RMSNorm (§1 LLM)
    theta: float = 1e4             # RoPE base (§1 LLM, [inferred] Llama default)
    mm_hidden: int = 32            # C of the PEL (§1 PEL)
    pel_heads: int = 8
    patch: int = 14
    conv_stride: int = 2
    image_size: int = 112          # S; 672 released (1344 HD)
    empty_crop: int = 16           # [:16, :16] when no patch is valid (slicing clamps on tiny S)
    teacher_hidden: int = 32       # C_t (CLIP-L: 1024)
    teacher_patch: int = 14
    teacher_image_size: int = 56   # 336 released
    pal_heads: int = 8
    pal_layer_rate: Optional[int] = None  # None: max(1, layers // 8) (4 released)
    ln_eps: float = 1e-5

    @classmethod
    def evev1_7b(cls, hd: bool = False) -> "EVEv1Shape":
        """The released EVE-7B-v1.0 sizes (§1, §4)."""
        return cls(layers=32, hidden=4096, heads=32, ffn=11008, vocab=32000, mm_hidden=1024,
                   image_size=1344 if hd else 672, teacher_hidden=1024, teacher_image_size=336,
                   pal_layer_rate=None)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def pal_layers(self) -> List[int]:
        """Tapped hidden-state indices, query first (§2 Student)."""
        rate = self.pal_layer_rate or max(1, self.layers // 8)
        return (self.layers - torch.arange(0, self.layers + 1, rate)).tolist()


def weight_shapes(s: EVEv1Shape) -> Dict[str, Tuple[int, ...]]:
    """Every parameter (teacher excluded) under its released HF name (§4 table)."""
    C, H, T, p = s.mm_hidden, s.hidden, s.teacher_hidden, s.patch
    out = {VT + "patch_embedding.weight": (C, 3, p, p), VT + "class_embedding": (C,),
           VT + "split_embedding": (C,)}
    for a in ("local", "global"):
        q = f"{VT}{a}_attention."
        out.update({q + "q.0.weight": (C,), q + "q.0.bias": (C,), q + "q.1.weight": (C, C),
                    q + "kv.0.weight": (C,), q + "kv.0.bias": (C,), q + "kv.1.weight": (2 * C, C),
                    q + "proj.weight": (C, C), q + "proj.bias": (C,)})
    out.update({"model.mm_projector.0.weight": (H, C), "model.mm_projector.0.bias": (H,),
                "model.mm_projector.2.weight": (H, H), "model.mm_projector.2.bias": (H,)})
    for j in range(len(s.pal_layers)):
        n = f"{COMP}norm_layer.{j}."
        out.update({n + "0.weight": (H,), n + "0.bias": (H,), n + "1.weight": (T, H)})
    out.update({COMP + "input_layer.weight": (T, H), COMP + "input_layer.bias": (T,),
                COMP + "output_layer.weight": (T, T), COMP + "output_layer.bias": (T,),
                "model.embed_tokens.weight": (s.vocab, H), "model.norm.weight": (H,),
                "lm_head.weight": (s.vocab, H)})
    for i in range(s.layers):
        m = f"model.layers.{i}."
        out.update({m + "input_layernorm.weight": (H,), m + "post_attention_layernorm.weight": (H,),
                    **{f"{m}self_attn.{x}_proj.weight": (H, H) for x in "qkvo"},
                    m + "mlp.gate_proj.weight": (s.ffn, H), m + "mlp.up_proj.weight": (s.ffn, H),
                    m + "mlp.down_proj.weight": (H, s.ffn)})
    return out


def random_weights(shape: EVEv1Shape, seed: int, dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """Random weights, never zero: norm weights 1 + N(0, 0.1), biases N(0, 0.1), class/split
    embeddings N(0, 1) (their init is ``randn``), matrices N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for name, size in weight_shapes(shape).items():
        r = torch.randn(*size, generator=g, dtype=torch.float64)
        if name.endswith("_embedding") or name == "model.embed_tokens.weight":
            pass
        elif len(size) == 1:
            r = r * 0.1 + (0.0 if name.endswith("bias") else 1.0)
        else:
            r = r / math.sqrt(math.prod(size[1:]))
        w[name] = r.to(dtype)
    return w


def _ln(x, w, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], w[prefix + "weight"], w[prefix + "bias"], eps)


def _heads_attend(q, k, v, heads, scale):
    """q [n, W], k/v [n, m, W] -> [n, W]: per head softmax over the m keys (no projections)."""
    n, m, width = k.shape
    d = width // heads
    qh, kh, vh = q.view(n, heads, d), k.view(n, m, heads, d), v.view(n, m, heads, d)
    attn = (torch.einsum("nhd,nmhd->nhm", qh, kh) * scale).softmax(-1)
    return torch.einsum("nhm,nmhd->nhd", attn, vh).reshape(n, width)


def local_attention(w, x, shape: EVEv1Shape):
    """§1 step 3: ``x [C, H, W]`` -> (``[h*w, C]`` row-major, (h, w)), h = H // conv_stride
    (an odd last row/column is dropped, as avg_pool2d does)."""
    p, (C, H, W), s = VT + "local_attention.", x.shape, shape.conv_stride
    h, wd = H // s, W // s
    x = x[:, :h * s, :wd * s]
    pooled = F.avg_pool2d(x[None], s, s)[0].flatten(1).t()                       # [hw, C]
    sub = x.reshape(C, h, s, wd, s).permute(1, 3, 2, 4, 0).reshape(h * wd, s * s, C)
    q = F.linear(_ln(pooled, w, p + "q.0.", shape.ln_eps), w[p + "q.1.weight"])
    kv = F.linear(_ln(sub, w, p + "kv.0.", shape.ln_eps), w[p + "kv.1.weight"])  # [hw, 4, 2C]
    agg = _heads_attend(q, kv[..., :C], kv[..., C:], shape.pel_heads, C ** -0.5)  # scale: full C
    return pooled + F.linear(agg, w[p + "proj.weight"], w[p + "proj.bias"]), (h, wd)


def global_attention(w, x, shape: EVEv1Shape):
    """§1 step 4: the class embedding attends over all ``x [n, C]`` -> cls ``[C]``."""
    p, C = VT + "global_attention.", x.shape[-1]
    cls = w[VT + "class_embedding"]
    q = F.linear(_ln(cls[None], w, p + "q.0.", shape.ln_eps), w[p + "q.1.weight"])  # [1, C]
    kv = F.linear(_ln(x, w, p + "kv.0.", shape.ln_eps), w[p + "kv.1.weight"])[None]
    agg = _heads_attend(q, kv[..., :C], kv[..., C:], shape.pel_heads, C ** -0.5)
    return cls + F.linear(agg[0], w[p + "proj.weight"], w[p + "proj.bias"])


def pel_tokens(w, pixel, mask, shape: EVEv1Shape):
    """§1 PEL steps 1-5 for one image: ``pixel [3, S, S]`` + ``mask [S, S]`` (or ``pixel
    [4, S, S]`` with ``mask=None``) -> (``[1 + h(w+1), C]`` before the projector, (h, w))."""
    if mask is None:
        pixel, mask = pixel[:3], pixel[3]
    feat = F.conv2d(pixel[None], w[VT + "patch_embedding.weight"], stride=shape.patch)[0]
    pm = F.avg_pool2d(mask[None, None].to(feat.dtype), shape.patch, shape.patch)[0, 0]
    assert torch.equal(pm, pm.round()), "mask not aligned to patches (official code asserts it)"
    valid = pm > 0
    if valid.any():  # crop to the bounding box of valid patches (§1 step 2)
        rows, cols = valid.any(1).nonzero()[:, 0], valid.any(0).nonzero()[:, 0]
        feat = feat[:, int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
    else:
        feat = feat[:, :shape.empty_crop, :shape.empty_crop]
    grid, (h, wd) = local_attention(w, feat, shape)
    cls = global_attention(w, grid, shape)
    split = w[VT + "split_embedding"].expand(h, 1, -1)  # after each row (§1 step 5)
    rows = torch.cat([grid.view(h, wd, -1), split], 1).reshape(h * (wd + 1), -1)
    return torch.cat([cls[None], rows]), (h, wd)


def projector(w, x):
    """§1 step 6: ``mlp2x_gelu`` on every token (cls and split included)."""
    p = "model.mm_projector."
    x = F.gelu(F.linear(x, w[p + "0.weight"], w[p + "0.bias"]))  # exact GELU (nn.GELU())
    return F.linear(x, w[p + "2.weight"], w[p + "2.bias"])


def pel_forward(w, pixel, mask, shape: EVEv1Shape):
    """One image -> (``[1 + h(w+1), hidden]`` LLM embeddings, (h, w))."""
    tokens, hw = pel_tokens(w, pixel, mask, shape)
    return projector(w, tokens), hw


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    """HF rotate_half RoPE; ``x [b, heads, s, d]``, ``pos [b, s]``."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos[..., None].double() * inv
    ang = torch.cat([ang, ang], -1)[:, None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def decoder_forward(w, embeds, position_ids, segment_ids, shape: EVEv1Shape):
    """§1 LLM: Llama decoder on ``embeds [b, s, hidden]``; attention causal within a segment
    (packing). Returns (logits, hs) with ``hs[0]`` = embeds, ``hs[k]`` = output of layer k,
    ``hs[L]`` after the final RMSNorm (HF ``output_hidden_states``)."""
    b, s, _ = embeds.shape
    nh, d = shape.heads, shape.head_dim
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    x, hs = embeds, [embeds]
    for i in range(shape.layers):
        m = f"model.layers.{i}."
        a = _rms(x, w[m + "input_layernorm.weight"], shape.eps)
        q, k, v = (F.linear(a, w[f"{m}self_attn.{n}_proj.weight"]).view(b, s, nh, d).transpose(1, 2)
                   for n in "qkv")
        q, k = _rope(q, position_ids, shape.theta), _rope(k, position_ids, shape.theta)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        ctx = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ v
        x = x + F.linear(ctx.transpose(1, 2).reshape(b, s, nh * d), w[m + "self_attn.o_proj.weight"])
        a = _rms(x, w[m + "post_attention_layernorm.weight"], shape.eps)
        gate, up = F.linear(a, w[m + "mlp.gate_proj.weight"]), F.linear(a, w[m + "mlp.up_proj.weight"])
        x = x + F.linear(F.silu(gate) * up, w[m + "mlp.down_proj.weight"])
        hs.append(x)
    hs[-1] = _rms(x, w["model.norm.weight"], shape.eps)
    return F.linear(hs[-1], w["lm_head.weight"]), hs


def pal_head(w, taps, shape: EVEv1Shape):
    """§2 Heads: ``taps [n, J, hidden]`` (hs at ``pal_layers``, hs[L] first) -> ``[n, C_t]``."""
    proj = [F.linear(_ln(taps[:, j], w, f"{COMP}norm_layer.{j}.0.", shape.ln_eps),
                     w[f"{COMP}norm_layer.{j}.1.weight"]) for j in range(taps.shape[1])]
    kv = torch.stack(proj[1:], 1)  # keys = values = the other projected layers
    fused = _heads_attend(proj[0], kv, kv, shape.pal_heads, shape.teacher_hidden ** -0.5)
    return (F.linear(taps[:, 0], w[COMP + "input_layer.weight"], w[COMP + "input_layer.bias"])
            + F.linear(fused, w[COMP + "output_layer.weight"], w[COMP + "output_layer.bias"]))


def pal_outputs(w, hs, image_spans, shape: EVEv1Shape, hd: bool = False) -> List[torch.Tensor]:
    """§2 Student: per image ``(row, start, h, w)`` (start = its cls position) -> ``[P, C_t]``,
    row-major patches (no cls, no split column; HD: 2x2 average pool of the raw states)."""
    out = []
    for row, start, h, wd in image_spans:
        t = torch.stack([hs[l][row, start + 1:start + 1 + h * (wd + 1)] for l in shape.pal_layers], 1)
        t = t.view(h, wd + 1, *t.shape[1:])[:, :wd]                              # [h, w, J, H]
        if hd:
            t = F.avg_pool2d(t.permute(2, 3, 0, 1), 2, 2).permute(2, 3, 0, 1)
        out.append(pal_head(w, t.reshape(-1, *t.shape[2:]), shape))
    return out


def pal_loss(w, hs, image_spans, teacher_feats, teacher_valid, shape: EVEv1Shape, hd: bool = False,
             text_spans: Sequence[Tuple[int, int, int]] = ()):
    """§2 Loss: sum over images of ``1 - mean cos(out, teacher[valid])`` / max(n_img, 1);
    ``teacher_feats [n_img, P_t, C_t]``, ``teacher_valid [n_img, P_t]`` bool (row-major);
    ``text_spans`` ``(row, start, n)`` add ``1 - cos(x, x.detach())`` (0, zero gradient)."""
    loss = hs[0].new_zeros(())
    for i, out in enumerate(pal_outputs(w, hs, image_spans, shape, hd)):
        target = teacher_feats[i][teacher_valid[i]].to(out.dtype)
        assert target.shape == out.shape, (target.shape, out.shape)
        loss = loss + 1 - F.cosine_similarity(out, target, dim=-1).mean()
    for row, start, n in text_spans:
        out = pal_head(w, torch.stack([hs[l][row, start:start + n] for l in shape.pal_layers], 1), shape)
        loss = loss + 1 - F.cosine_similarity(out, out.detach(), dim=-1).mean()
    return loss / max(len(image_spans), 1)


def teacher_valid_from_mask(mask336, patch: int = 14) -> torch.Tensor:
    """§2 Teacher: ``mask [.., S_t, S_t]`` -> ``[.., (S_t/patch)^2]`` bool. The pooled mask must be
    0 or 1 (the official code asserts it), so ``> 0`` and ``== 1`` agree; we use ``> 0``."""
    pm = F.avg_pool2d(mask336.reshape(-1, 1, *mask336.shape[-2:]).double(), patch, patch)
    assert torch.equal(pm, pm.round()), "teacher mask not aligned to patches"
    return (pm > 0).flatten(1).reshape(*mask336.shape[:-2], -1)


def forward(w, batch, shape: EVEv1Shape, hd: bool = False) -> dict:
    """The whole step: splice images at ``batch['image_starts']`` (row, cls position), decoder,
    CE (mean over non-ignored tokens), PAL; ``loss = ce + 1.0 * pal`` (§2 Loss)."""
    x = w["model.embed_tokens.weight"][batch["tokens"]].clone()
    spans = []
    for img, (row, start) in zip(batch["images"], batch["image_starts"]):
        tok, (h, wd) = pel_forward(w, img.to(x.dtype), None, shape)
        x[row, start:start + tok.shape[0]] = tok
        spans.append((row, start, h, wd))
    logits, hs = decoder_forward(w, x, batch["position_ids"], batch["segment_ids"], shape)
    ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    pal = pal_loss(w, hs, spans, batch["teacher_feats"], batch["teacher_valid"], shape, hd,
                   batch.get("text_spans", ()))
    return {"logits": logits, "hs": hs, "ce": ce, "pal": pal, "loss": ce + 1.0 * pal, "spans": spans}


def make_batch(shape: EVEv1Shape, grids, rows: int, seq: int, seed: int, hd: bool = False) -> dict:
    """Packed rows of samples: a grid ``(gh, gw)`` (in teacher patches) is an image sample
    [BOS, image, text], ``None`` a text-only one (no image tokens, §1 Token layout); padding ends
    each row (own segment). Images are centred on the S x S canvas (channel 3 = mask); teacher
    features are random. Keys: tokens, labels (shifted), position_ids, segment_ids, is_vision,
    images [4, S, S], image_starts (row, cls position), teacher_feats, teacher_valid, text_spans."""
    g = torch.Generator().manual_seed(seed)
    ratio = 2 if hd else 1
    unit, G = shape.patch * shape.conv_stride * ratio, shape.teacher_image_size // shape.teacher_patch
    assert shape.image_size // unit == G, "student canvas and teacher canvas disagree"
    B = {k: torch.zeros(rows, seq, dtype=torch.long) for k in ("tokens", "position_ids", "segment_ids")}
    B["labels"] = torch.full((rows, seq), -100, dtype=torch.long)
    B["is_vision"] = torch.zeros(rows, seq, dtype=torch.bool)
    B.update(images=[], image_starts=[], teacher_valid=[], text_spans=[])
    row, t, seg = 0, 0, 0
    blank = 1 + (min(shape.empty_crop, shape.image_size // shape.patch) // shape.conv_stride) * \
        (min(shape.empty_crop, shape.image_size // shape.patch) // shape.conv_stride + 1)
    for grid in grids:
        n_img = 0 if grid is None else 1 + grid[0] * ratio * (grid[1] * ratio + 1)
        n = 1 + n_img + int(torch.randint(3, 8, (1,), generator=g))
        if t + n > seq:
            B["segment_ids"][row, t:] = seg + 1  # padding: its own segment
            row, t, seg = row + 1, 0, seg + 2
        assert row < rows, "grids do not fit"
        toks = torch.randint(3, shape.vocab, (n,), generator=g)
        toks[0], toks[1:1 + n_img] = 1, 0  # BOS; image positions hold pad (0)
        tgt = torch.where(torch.rand(n, generator=g) > 0.3, toks, torch.full_like(toks, -100))
        tgt[:1 + n_img] = -100  # BOS and image tokens never supervised (§1 Token layout)
        B["tokens"][row, t:t + n], B["labels"][row, t:t + n - 1] = toks, tgt[1:]
        B["position_ids"][row, t:t + n], B["segment_ids"][row, t:t + n] = torch.arange(n), seg
        canvas = torch.zeros(4, shape.image_size, shape.image_size)
        mask_t = torch.zeros(shape.teacher_image_size, shape.teacher_image_size)
        if grid is None:
            B["text_spans"].append((row, t, min(n, blank)))
        else:
            (gh, gw), oy, ox = grid, (G - grid[0]) // 2, (G - grid[1]) // 2
            ys, xs = slice(oy * unit, (oy + gh) * unit), slice(ox * unit, (ox + gw) * unit)
            canvas[:3, ys, xs] = torch.randn(3, gh * unit, gw * unit, generator=g)
            canvas[3, ys, xs] = 1
            tp = shape.teacher_patch
            mask_t[oy * tp:(oy + gh) * tp, ox * tp:(ox + gw) * tp] = 1
            B["images"].append(canvas)
            B["image_starts"].append((row, t + 1))  # -200 follows BOS (§1 Token layout)
            B["is_vision"][row, t + 1:t + 1 + n_img] = True
            B["teacher_valid"].append(teacher_valid_from_mask(mask_t, tp))
        seg, t = seg + 1, t + n
    B["segment_ids"][row, t:] = seg
    n_img = len(B["images"])
    B["teacher_valid"] = torch.stack(B["teacher_valid"]) if n_img else torch.zeros(0, G * G, dtype=torch.bool)
    B["teacher_feats"] = torch.randn(n_img, G * G, shape.teacher_hidden, generator=g)
    return B
