"""Rank functions of the trainer tests: they call ``eve_megatron.pretrain.pretrain`` in-process."""

from __future__ import annotations

import os
import signal
from typing import Dict, List

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from eve_megatron.models.eve.sharding import gather_full
from eve_megatron.pretrain import pretrain
from eve_megatron.training import checkpointing
from eve_megatron.training.loop import NonFiniteError
from eve_megatron.training.step import forward_step


def base_args(data: str, iters: int, *extra) -> List[str]:
    """A tiny, fast run: 4 rows of 64 tokens per step, fp32, no data workers."""
    return ["--model-preset", "tiny", "--data-path", data, "--seq-length", "64",
            "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(iters),
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--num-workers", "0",
            "--log-interval", "1", "--no-progress", "--seed", "7", *map(str, extra)]


def _losses(result) -> List[float]:
    return result.losses if ps.is_pipeline_last_stage(ignore_virtual=True) else []


def resume_suite(root: str, data: str) -> Dict:
    """Uninterrupted 8 steps; 4 steps + exit; resume to 8 (DP2 or any layout of the world)."""
    full = pretrain(base_args(data, 8, "--save", f"{root}/full", "--save-interval", 4))
    part = pretrain(base_args(data, 8, "--save", f"{root}/part", "--save-interval", 2,
                              "--exit-interval", 4))
    rest = pretrain(base_args(data, 8, "--load", f"{root}/part", "--save", f"{root}/part",
                              "--save-interval", 2))
    return {"full": _losses(full), "part": _losses(part), "rest": _losses(rest),
            "rest_start": rest.start_iteration}


def kill_during_save(root: str, data: str, kill_at: int) -> None:
    """Train with saves every 2 steps; SIGKILL rank 0 in the middle of saving ``kill_at``
    (after its shards are written, before the checkpoint is complete)."""
    real_save = dist_checkpointing.save

    def save_then_die(state, path, *args, **kwargs):
        out = real_save(state, path, *args, **kwargs)
        if f"iter_{kill_at:07d}" in path and torch.distributed.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    dist_checkpointing.save = save_then_die
    pretrain(base_args(data, 8, "--save", root, "--save-interval", 2))


def resume_after_kill(root: str, ref_root: str, data: str) -> Dict:
    """The uninterrupted reference, then the resume of the killed run."""
    latest = checkpointing.latest_iteration(root)
    ref = pretrain(base_args(data, 8, "--save", ref_root, "--save-interval", 2))
    rest = pretrain(base_args(data, 8, "--load", root, "--save", root, "--save-interval", 2))
    return {"latest_before": latest, "ref": _losses(ref), "rest": _losses(rest),
            "rest_start": rest.start_iteration}


def init_and_reference(init: str, data: str, iters: int) -> Dict:
    """World of 1: save the initial weights (iteration 0), then train TP1 from them."""
    pretrain(base_args(data, 0, "--save", init, "--no-save-optim", "--lr-warmup-iters", 0))
    ref = pretrain(base_args(data, iters, "--load", init, "--finetune"))
    return {"losses": ref.losses}


def layout_runs(init: str, data: str, iters: int, runs) -> Dict:
    """Train from the same initial checkpoint once per ``(name, extra flags)``."""
    out = {}
    for name, extra in runs:
        res = pretrain(base_args(data, iters, "--load", init, "--finetune", *extra))
        out[name] = _losses(res)
    return out


class Snapshots:
    """Hooks that gather the full (TP-gathered) weights before and after training."""

    def __init__(self):
        self.before = self.after = None

    def _full(self, trainer):
        full = {}
        for chunk in trainer.chunks:
            full.update(gather_full(chunk))
        return full

    def before_train(self, trainer):
        self.before = self._full(trainer)
        self.calls = {"prepare_grads": 0, "get_grad_norm": 0}  # gradient passes per run
        for name in self.calls:
            method = getattr(trainer.optimizer, name)

            def counted(*args, _name=name, _method=method, **kwargs):
                self.calls[_name] += 1
                return _method(*args, **kwargs)
            setattr(trainer.optimizer, name, counted)
        self.ddp_elements = sum(p.numel() for m in trainer.ddp for b in m.buffers for p in b.params)
        self.requires_grad = {n for c in trainer.chunks for n, p in c.named_parameters()
                              if p.requires_grad}

    def after_step(self, trainer, result):
        if trainer.state.iteration == trainer.cfg.training.iterations:
            self.after = self._full(trainer)
            opts = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
            self.opt_state_elements = sum(
                v.numel() for o in opts for st in o.optimizer.state.values()
                for k, v in st.items() if k == "exp_avg")


def stage_run(data: str, args) -> Dict:
    """One stage under TP2: weights before/after, DDP buffer and optimizer-state sizes."""
    hooks = Snapshots()
    res = pretrain(base_args(data, 2, "--tensor-model-parallel-size", 2, *args), hooks=hooks)
    return {"before": hooks.before, "after": hooks.after, "ddp_elements": hooks.ddp_elements,
            "opt_state_elements": hooks.opt_state_elements, "trainable": res.trainable,
            "requires_grad": hooks.requires_grad, "losses": res.losses, "calls": hooks.calls}


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NanInjector:
    """Forward step + hooks: NaN loss at ``loss_iters``, NaN gradients at ``grad_iters``,
    NaN weights after ``poison_after``; records every rank's weights after each step."""

    def __init__(self, loss_iters=(), grad_iters=(), poison_after=None):
        self.loss_iters, self.grad_iters, self.poison_after = loss_iters, grad_iters, poison_after
        self.current = 1
        self.weights = {}

    def forward_step(self, data_iterator, model):
        output, loss_fn = forward_step(data_iterator, model)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            if self.current in self.loss_iters:
                output = output * float("nan")
            elif self.current in self.grad_iters:
                output = _NanGrad.apply(output)
        return output, loss_fn

    def after_step(self, trainer, result):
        it = trainer.state.iteration
        self.weights[it] = [p.detach().clone() for c in trainer.chunks for p in c.parameters()]
        if it == self.poison_after and torch.distributed.get_rank() == 0:
            next(trainer.chunks[0].parameters()).data.fill_(float("nan"))
        self.current = it + 1


def nan_suite(root: str, data: str) -> Dict:
    """PP2: skipped NaN-loss and NaN-gradient steps; N in a row stops; no non-finite save."""
    inj = NanInjector(loss_iters=(3,), grad_iters=(5,))
    res = pretrain(base_args(data, 6, "--pipeline-model-parallel-size", 2),
                   forward_step_func=inj.forward_step, hooks=inj)
    w = inj.weights
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(w[a], w[b]))  # noqa: E731
    out = {"losses": _losses(res), "skipped": res.skipped_iterations,
           "unchanged_3": same(2, 3), "unchanged_5": same(4, 5), "changed_4": not same(3, 4),
           "changed_6": not same(5, 6),
           "finite": all(torch.isfinite(x).all().item() for x in w[6])}
    inj = NanInjector(loss_iters=(2, 3, 4))
    try:
        pretrain(base_args(data, 8, "--pipeline-model-parallel-size", 2,
                           "--max-consecutive-nonfinite", 3),
                 forward_step_func=inj.forward_step, hooks=inj)
        out["stop_error"] = None
    except NonFiniteError as exc:
        out["stop_error"] = str(exc)
    inj = NanInjector(poison_after=3)
    try:
        pretrain(base_args(data, 8, "--pipeline-model-parallel-size", 2, "--save", root,
                           "--save-interval", 2), forward_step_func=inj.forward_step, hooks=inj)
        out["save_error"] = None
    except NonFiniteError as exc:
        out["save_error"] = str(exc)
    out["latest"] = checkpointing.latest_iteration(root)
    return out


def _logits(chunk, batches):
    from megatron.core import tensor_parallel

    from tests.reference_eve import model_batch

    out = []
    with torch.no_grad():
        for b in batches:
            mb = model_batch(b)
            mb.pop("labels"), mb.pop("loss_mask")
            logits = chunk(**mb)
            out.append(tensor_parallel.gather_from_tensor_model_parallel_region(logits))
    return out


def copy_preserves_logits(root: str) -> Dict:
    """none-model (TP2, reference weights) -> checkpoint -> copy tool under PP2 -> all-model
    (DP2): logits on random batches, the copied weights, and the reference logits."""
    from eve_megatron.models.eve import eve_config
    from eve_megatron.models.eve.sharding import load_full_state_dict
    from eve_megatron.parallel import ParallelConfig, initialize_parallel
    from eve_megatron.training.copy_vision import copy_vision_branch
    from eve_megatron.training.model_setup import build_model_chunks
    from tests.reference_eve import RefShape, forward, make_batch, make_weights, to_megatron

    shape = RefShape(decoupling="none")
    weights = make_weights(shape, seed=21)
    batches = [make_batch(shape, 2, 64, seed=40 + i) for i in range(3)]
    batches.append(make_batch(shape, 1, 64, seed=50, with_images=False))
    initialize_parallel(ParallelConfig(tensor_model_parallel_size=2))
    chunks = build_model_chunks(eve_config("tiny", decoupling="none", tensor_model_parallel_size=2))
    load_full_state_dict(chunks[0], to_megatron(weights, shape))
    before = _logits(chunks[0], batches)
    checkpointing.save_checkpoint(f"{root}/none", 5, chunks)
    initialize_parallel(ParallelConfig(pipeline_model_parallel_size=2))
    summary = copy_vision_branch(f"{root}/none", f"{root}/all")
    out = {"before": before, "reference": [forward(weights, shape, b) for b in batches],
           "summary": summary, "fields": checkpointing.read_model_fields(f"{root}/all")}
    for name, tp in (("after_tp2", 2), ("after_tp1", 1)):  # same layout as before; another one
        initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp))
        chunks = build_model_chunks(eve_config("tiny", decoupling="all",
                                               tensor_model_parallel_size=tp))
        out["iteration"], _ = checkpointing.load_checkpoint(f"{root}/all", chunks)
        out[name] = _logits(chunks[0], batches)
    out["full"] = gather_full(chunks[0])
    return out
