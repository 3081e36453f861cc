"""The trainer's optimizer step against an independent plain-PyTorch AdamW + LR schedule.

The trainer runs five real steps (``pretrain``: Megatron's schedule, DDP, the distributed
optimizer, clipping, ``OptimizerParamScheduler``) on one rank in fp32; the gradients it
handed the optimizer are recorded at each step. The reference below starts from the same
initial weights and applies, to those gradients, the update as Megatron-LM defines it:

* LR (``OptimizerParamScheduler.get_lr``): ``lr(n) = max_lr * n / W`` for ``n <= W`` (linear
  warmup from 0), then ``min_lr + (max_lr - min_lr) * (1 + cos(pi * (n - W) / (D - W))) / 2``,
  ``min_lr`` after ``D``; step ``k`` (1-based) uses ``n = k - 1``.
* weight decay ``wd`` for every parameter except biases and 1-D parameters (norm weights),
  which get none (Megatron's standard param groups, ``wd_mult = 0``).
* clipping of the global gradient norm ``N``: grads times ``c / (N + 1e-6)`` when below 1
  (with ``c = 4`` some of the steps clip, measured norms 3.2-5.7).
* Adam with decoupled weight decay (AdamW): ``p *= 1 - lr * wd``; ``m = b1 m + (1 - b1) g``;
  ``v = b2 v + (1 - b2) g^2``; ``p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``.

With W = 1, D = 4 the five steps use lr 0 (Adam state moves, weights do not), lr, the
cosine at 1/3 and 2/3 of the decay, and min_lr, so every term above is used (two steps
would reach only the warmup: step 1's lr is 0). Every hyperparameter differs from its
default, so a flag the trainer ignored shows.
"""

from __future__ import annotations

import math
from typing import Dict, List

import pytest
import torch

from eve_megatron.launch import run_distributed
from tests.training_data import write_learnable_dataset

HP = dict(lr=1e-2, min_lr=1e-3, warmup=1, decay=4, wd=0.1, beta1=0.8, beta2=0.9, eps=1e-6,
          clip=4.0)
ITERS = 5
RTOL = 1e-6
"""Per tensor, ``||w - w_ref|| / ||w_ref||`` after every step: the trainer's fp32 weights
against the float64 reference (measured: ~1e-7, fp32 rounding)."""
FLAGS = ["--lr", HP["lr"], "--min-lr", HP["min_lr"], "--lr-warmup-iters", HP["warmup"],
         "--lr-decay-iters", HP["decay"], "--lr-decay-style", "cosine",
         "--weight-decay", HP["wd"], "--adam-beta1", HP["beta1"], "--adam-beta2", HP["beta2"],
         "--adam-eps", HP["eps"], "--clip-grad", HP["clip"]]


def megatron_lr(n: int, hp: Dict) -> float:
    """Megatron's scheduled LR after ``n`` scheduler steps (warmup from 0, cosine, min_lr)."""
    w, d = hp["warmup"], hp["decay"]
    if w > 0 and n <= w:
        return hp["lr"] * n / w
    if n > d:
        return hp["min_lr"]
    ratio = (n - w) / (d - w)
    return hp["min_lr"] + (hp["lr"] - hp["min_lr"]) * 0.5 * (math.cos(math.pi * ratio) + 1)


def decays(name: str, p: torch.Tensor) -> bool:
    """Megatron's standard groups: no weight decay on biases and 1-D parameters."""
    return not (name.endswith(".bias") or p.dim() == 1)


def reference_weights(initial: Dict, grads: List[Dict], hp: Dict) -> List[Dict]:
    """The weights after each step, in float64, from the recorded gradients."""
    w = {n: p.double().clone() for n, p in initial.items()}
    m = {n: torch.zeros_like(p) for n, p in w.items()}
    v = {n: torch.zeros_like(p) for n, p in w.items()}
    out = []
    for t, step_grads in enumerate(grads, start=1):
        g = {n: step_grads[n].double() for n in w}
        norm = math.sqrt(sum(float((x * x).sum()) for x in g.values()))
        coef = hp["clip"] / (norm + 1e-6)
        lr = megatron_lr(t - 1, hp)
        for n, p in w.items():
            gn = g[n] * coef if coef < 1.0 else g[n]
            if decays(n, p):
                p.mul_(1 - lr * hp["wd"])
            m[n].mul_(hp["beta1"]).add_(gn, alpha=1 - hp["beta1"])
            v[n].mul_(hp["beta2"]).addcmul_(gn, gn, value=1 - hp["beta2"])
            m_hat = m[n] / (1 - hp["beta1"] ** t)
            v_hat = v[n] / (1 - hp["beta2"] ** t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + hp["eps"]))
        out.append({n: p.clone() for n, p in w.items()})
    return out


def worst_error(run: Dict, hp: Dict) -> float:
    """Largest per-tensor ``||w - w_ref|| / ||w_ref||`` over all steps and tensors."""
    worst = 0.0
    refs = reference_weights(run["initial"], run["grads"], hp)
    for ours, ref in zip(run["weights"], refs):
        for n, r in ref.items():
            scale = float(r.norm()) or 1.0  # a zero-initialised bias at lr 0: absolute
            worst = max(worst, float((ours[n].double() - r).norm()) / scale)
    return worst


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One recorded trainer run (world of 1) on counting data, shared by the tests."""
    data = write_learnable_dataset(str(tmp_path_factory.mktemp("data") / "learnable"), seed=5)
    return run_distributed("tests.distributed.optimizer_workers:recorded_run", 1, data=data,
                           iters=ITERS, flags=[str(f) for f in FLAGS])[0]


def test_trainer_steps_equal_the_plain_pytorch_adamw_reference(run):
    """The trainer's weights after each of the five steps equal the reference's (RTOL)."""
    assert len(run["grads"]) == len(run["weights"]) == ITERS
    assert any(decays(n, p) for n, p in run["initial"].items())
    assert any(not decays(n, p) for n, p in run["initial"].items())
    for norm, grads in zip(run["grad_norms"], run["grads"]):  # the norm Megatron clipped by
        ours = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
        assert abs(ours - norm) <= 1e-6 * norm, (ours, norm)
    assert min(run["grad_norms"]) < HP["clip"] < max(run["grad_norms"]), run["grad_norms"]
    err = worst_error(run, HP)
    assert err <= RTOL, err


@pytest.mark.parametrize("wrong", [dict(wd=0.0), dict(beta1=0.9), dict(beta2=0.95),
                                   dict(eps=1e-8), dict(warmup=0), dict(min_lr=0.0),
                                   dict(clip=1.0)])
def test_the_comparison_sees_a_wrong_hyperparameter(run, wrong):
    """The same trainer run against a reference with one hyperparameter at another value
    (the default, or 0): the error is far above the tolerance."""
    assert worst_error(run, dict(HP, **wrong)) > 100 * RTOL, wrong
