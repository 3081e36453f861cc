"""A plain single-process PyTorch reference of the EVE math, independent of eve_megatron's code
(it asks only ``models/eve/weights.py`` which parts have vision copies: a fact, not math).

Written from ../shared/docs/eve_reference.md: HF-style weight names (separate q/k/v and
gate/up), the reference's dense blend ``text(x) * (1 - m) + vision(x) * m``, a loop of
``F.conv2d`` per image, explicit softmax attention with a per-sample causal mask and
HF-style RoPE. Also builds the random test batches (images of several aspect ratios,
text-only samples, packed rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F

from eve_megatron.models.eve.weights import has_vision_twin

BRANCHES = ("text", "vision")


@dataclass
class RefShape:
    """The shape of the model the reference builds."""

    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    vocab: int = 512
    vision_hidden: int = 32
    eps: float = 1e-6
    theta: float = 10000.0
    tied: bool = False
    decoupling: str = "all"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def make_weights(shape: RefShape, seed: int) -> Dict[str, torch.Tensor]:
    """Random weights with HF-like names; vision copies exist for every layer."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *size, std=0.05: torch.randn(*size, generator=g) * std  # noqa: E731
    h, d = shape.hidden, shape.head_dim
    w = {"embed": r(shape.vocab, h, std=0.5), "norm": 1 + r(h, std=0.1),
         "conv1.w": r(shape.vision_hidden, 3, 16, 16, std=0.02), "conv1.b": r(shape.vision_hidden),
         "conv2.w": r(h, shape.vision_hidden, 2, 2, std=0.1), "conv2.b": r(h),
         "cls": r(h, std=0.5), "split": r(h, std=0.5)}
    if not shape.tied:
        w["lm_head"] = r(shape.vocab, h, std=0.2)
    for i in range(shape.layers):
        for br in BRANCHES:
            p = f"layers.{i}.{br}."
            w[p + "ln1"], w[p + "ln2"] = 1 + r(h, std=0.1), 1 + r(h, std=0.1)
            w[p + "q.w"], w[p + "q.b"] = r(shape.heads * d, h, std=0.15), r(shape.heads * d)
            w[p + "k.w"], w[p + "k.b"] = r(shape.kv_heads * d, h, std=0.15), r(shape.kv_heads * d)
            w[p + "v.w"], w[p + "v.b"] = r(shape.kv_heads * d, h, std=0.15), r(shape.kv_heads * d)
            w[p + "o.w"] = r(h, shape.heads * d, std=0.1)
            w[p + "gate"], w[p + "up"] = r(shape.ffn, h, std=0.1), r(shape.ffn, h, std=0.1)
            w[p + "down"] = r(h, shape.ffn, std=0.1)
    return w


def to_megatron(w: Dict[str, torch.Tensor], shape: RefShape) -> Dict[str, torch.Tensor]:
    """The same weights under eve_megatron's full (TP=1) names and fused layouts."""
    out = {"embedding.word_embeddings.weight": w["embed"], "decoder.final_layernorm.weight": w["norm"],
           "embedding.patch_embedding.conv1.weight": w["conv1.w"],
           "embedding.patch_embedding.conv1.bias": w["conv1.b"],
           "embedding.patch_embedding.conv2.weight": w["conv2.w"],
           "embedding.patch_embedding.conv2.bias": w["conv2.b"],
           "embedding.patch_embedding.class_embedding": w["cls"],
           "embedding.patch_embedding.split_embedding": w["split"]}
    if not shape.tied:
        out["output_layer.weight"] = w["lm_head"]
    groups, per, d = shape.kv_heads, shape.heads // shape.kv_heads, shape.head_dim
    for i in range(shape.layers):
        for br in BRANCHES:
            p, v = f"layers.{i}.{br}.", "vision_" if br == "vision" else ""
            q = w[p + "q.w"].view(groups, per * d, -1)
            k, vv = w[p + "k.w"].view(groups, d, -1), w[p + "v.w"].view(groups, d, -1)
            qkv = torch.cat([q, k, vv], dim=1).reshape(-1, shape.hidden)
            qb = torch.cat([w[p + "q.b"].view(groups, -1), w[p + "k.b"].view(groups, -1),
                            w[p + "v.b"].view(groups, -1)], dim=1).reshape(-1)
            m = f"decoder.layers.{i}."
            split_attn = has_vision_twin(shape.decoupling, "self_attention")
            split_mlp = has_vision_twin(shape.decoupling, "mlp")
            if br == "text" or split_attn:
                out[m + f"{v}input_layernorm.weight"] = w[p + "ln1"]
                out[m + f"{v}pre_mlp_layernorm.weight"] = w[p + "ln2"]
                out[m + f"self_attention.{v}linear_qkv.weight"] = qkv
                out[m + f"self_attention.{v}linear_qkv.bias"] = qb
                out[m + f"self_attention.{v}linear_proj.weight"] = w[p + "o.w"]
            if br == "text" or split_mlp:
                out[m + f"{v}mlp.linear_fc1.weight"] = torch.cat([w[p + "gate"], w[p + "up"]])
                out[m + f"{v}mlp.linear_fc2.weight"] = w[p + "down"]
    return out


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _blend(x, m, w, p_text, p_vision, fn, shared_vision: bool):
    """Reference dense blend: both branches on every token, mixed by the modality mask."""
    a = fn(x, w, p_text)
    b = fn(x, w, p_text if shared_vision else p_vision)
    return a * (1 - m) + b * m


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos[..., None].float() * inv  # [b, s, d/2]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def image_tokens(w, image: torch.Tensor) -> torch.Tensor:
    """One image ``[3, H, W]`` -> ``[1 + h'(w'+1), hidden]`` via real convolutions."""
    f = F.conv2d(image[None], w["conv1.w"], w["conv1.b"], stride=16)
    f = F.conv2d(F.gelu(f), w["conv2.w"], w["conv2.b"], stride=2)[0]  # [h, h', w']
    split = w["split"][:, None, None].expand(-1, f.shape[1], 1)
    f = torch.cat([f, split], dim=2).flatten(1).t()
    return torch.cat([w["cls"][None], f])


def forward(w, shape: RefShape, batch) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` of the reference model on a test batch."""
    tokens, pos, vis, seg = batch["tokens"], batch["position_ids"], batch["is_vision"], batch["segment_ids"]
    x = w["embed"][tokens.masked_fill(vis, 0)]
    img = torch.cat([image_tokens(w, im) for im in batch["images"]]) if batch["images"] else None
    if img is not None:
        x = x.clone()
        x[vis] = img
    m = vis.float()[..., None]
    b, s, _ = x.shape
    mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    d, nh, nkv = shape.head_dim, shape.heads, shape.kv_heads
    for i in range(shape.layers):
        pt, pv = f"layers.{i}.text.", f"layers.{i}.vision."
        sa = not has_vision_twin(shape.decoupling, "self_attention")  # shared, not routed
        sm = not has_vision_twin(shape.decoupling, "mlp")
        lin = lambda t, ww, p, name: F.linear(t, ww[p + name + ".w"], ww.get(p + name + ".b"))  # noqa: E731
        ln = _blend(x, m, w, pt, pv, lambda t, ww, p: _rms(t, ww[p + "ln1"], shape.eps), sa)
        q = _blend(ln, m, w, pt, pv, lambda t, ww, p: lin(t, ww, p, "q"), sa)
        k = _blend(ln, m, w, pt, pv, lambda t, ww, p: lin(t, ww, p, "k"), sa)
        v = _blend(ln, m, w, pt, pv, lambda t, ww, p: lin(t, ww, p, "v"), sa)
        q = _rope(q.view(b, s, nh, d).transpose(1, 2), pos, shape.theta)
        k = _rope(k.view(b, s, nkv, d).transpose(1, 2), pos, shape.theta)
        v = v.view(b, s, nkv, d).transpose(1, 2)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, nh * d)
        x = x + _blend(ctx, m, w, pt, pv, lambda t, ww, p: F.linear(t, ww[p + "o.w"]), sa)
        ln = _blend(x, m, w, pt, pv, lambda t, ww, p: _rms(t, ww[p + "ln2"], shape.eps), sa)
        mlp = lambda t, ww, p: F.linear(F.silu(F.linear(t, ww[p + "gate"])) * F.linear(t, ww[p + "up"]), ww[p + "down"])  # noqa: E731
        x = x + _blend(ln, m, w, pt, pv, mlp, sm)
    x = _rms(x, w["norm"], shape.eps)
    return F.linear(x, w["embed"] if shape.tied else w["lm_head"])


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy ``[b, s]``, 0 where ``labels == -100``."""
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten().clamp(min=0), reduction="none")
    return loss.view(labels.shape) * (labels != -100)


def make_batch(shape: RefShape, b: int, s: int, seed: int, with_images: bool = True,
               packed: bool = True):
    """A batch in the batch contract: packed rows mixing captioned images of several aspect
    ratios and text-only samples, padding at the end of rows. Also returns the images."""
    g = torch.Generator().manual_seed(seed)
    grids = [(1, 1), (2, 3), (3, 1), (1, 4), (2, 2)]
    tokens = torch.zeros(b, s, dtype=torch.long)
    labels = torch.full((b, s), -100, dtype=torch.long)
    pos = torch.zeros(b, s, dtype=torch.long)
    vis = torch.zeros(b, s, dtype=torch.bool)
    seg = torch.zeros(b, s, dtype=torch.long)
    bounds, images, seg_id = [0], [], 0
    for row in range(b):
        t = 0
        while t < s:
            room = s - t
            n_text = int(torch.randint(4, 12, (1,), generator=g))
            use_img = with_images and bool(torch.randint(0, 3, (1,), generator=g) > 0)
            gh, gw = grids[int(torch.randint(0, len(grids), (1,), generator=g))]
            n_img = 1 + gh * (gw + 1) if use_img else 0
            n = n_img + n_text
            if n > room or (not packed and t > 0):
                n, n_img = room, 0  # padding segment
                toks = torch.randint(0, shape.vocab, (n,), generator=g)
                sup = torch.zeros(n, dtype=torch.bool)
            else:
                toks = torch.randint(0, shape.vocab, (n,), generator=g)
                sup = torch.rand(n, generator=g) > 0.3
                sup[:n_img] = False
                if n_img:
                    images.append(torch.randn(3, 32 * gh, 32 * gw, generator=g))
                    vis[row, t:t + n_img] = True
                    toks[:n_img] = 0
            tokens[row, t:t + n] = toks
            pos[row, t:t + n] = torch.arange(n)
            seg[row, t:t + n] = seg_id
            tgt = torch.full((n,), -100, dtype=torch.long)
            tgt[:-1] = torch.where(sup[1:], toks[1:], torch.full_like(toks[1:], -100))
            labels[row, t:t + n] = tgt
            seg_id += 1
            t += n
            bounds.append(row * s + t)
    cu = torch.tensor(bounds, dtype=torch.int32)
    return {"tokens": tokens, "labels": labels, "loss_mask": (labels != -100).float(),
            "position_ids": pos, "is_vision": vis, "cu_seqlens": cu, "segment_ids": seg,
            "max_seqlen": int((cu[1:] - cu[:-1]).max()), "images": images}


def model_batch(batch) -> dict:
    """The batch-contract fields eve_megatron consumes (images as 32x32 blocks)."""
    from eve_megatron.models.eve import images_to_blocks

    pv, grid = images_to_blocks(batch["images"])
    keys = ("tokens", "labels", "loss_mask", "position_ids", "is_vision", "cu_seqlens", "max_seqlen")
    out = {k: batch[k] for k in keys}
    out.update(pixel_values=pv, image_grid_hw=grid)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def collate_rows(rows: List[dict]) -> dict:
    """Stack single- or multi-row test batches into one batch (cu_seqlens re-based)."""
    out = {k: torch.cat([r[k] for r in rows]) for k in
           ("tokens", "labels", "loss_mask", "position_ids", "is_vision")}
    cu, seg, base, seg_base = [torch.zeros(1, dtype=torch.int32)], [], 0, 0
    for r in rows:
        cu.append(r["cu_seqlens"][1:] + base)
        seg.append(r["segment_ids"] + seg_base)
        base += r["tokens"].numel()
        seg_base = int(seg[-1].max()) + 1
    out["cu_seqlens"] = torch.cat(cu)
    out["segment_ids"] = torch.cat(seg)
    out["max_seqlen"] = int((out["cu_seqlens"][1:] - out["cu_seqlens"][:-1]).max())
    out["images"] = [im for r in rows for im in r["images"]]
    return out


def reference_step(shape: RefShape, weights: Dict[str, torch.Tensor], batch: dict):
    """Reference logits, per-token loss and gradients (Megatron names) of the mean loss."""
    wr = {k: v.clone().requires_grad_() for k, v in weights.items()}
    logits = forward(wr, shape, batch)
    per_token = token_losses(logits, batch["labels"])
    (per_token.sum() / batch["loss_mask"].sum()).backward()
    grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in wr.items()}
    return logits.detach(), per_token.detach(), to_megatron(grads, shape)
