"""Rank function of the optimizer reference test: a real trainer run whose gradients and
weights are recorded at every step."""

from __future__ import annotations

from typing import Dict, List

from eve_megatron.pretrain import pretrain
from tests.distributed.pretrain_workers import base_args


class StepRecorder:
    """Trainer hooks: the initial weights, then per step the gradients the optimizer was
    given (each parameter's ``main_grad``, read when the optimizer starts its step: after
    the data-parallel reduction and the division by the token count, before clipping) and
    the weights after the step."""

    def __init__(self):
        self.initial: Dict = {}
        self.grads: List[Dict] = []
        self.weights: List[Dict] = []
        self.grad_norms: List[float] = []

    def _named(self, trainer):
        return [(n, p) for c in trainer.chunks for n, p in c.named_parameters() if p.requires_grad]

    def before_train(self, trainer):
        self.initial = {n: p.detach().clone() for n, p in self._named(trainer)}
        optimizer, prepare = trainer.optimizer, trainer.optimizer.prepare_grads

        def recording_prepare_grads(*args, **kwargs):
            self.grads.append({n: p.main_grad.detach().clone() for n, p in self._named(trainer)})
            return prepare(*args, **kwargs)

        optimizer.prepare_grads = recording_prepare_grads

    def after_step(self, trainer, result):
        assert not result.skipped
        self.weights.append({n: p.detach().clone() for n, p in self._named(trainer)})
        self.grad_norms.append(result.grad_norm)


def recorded_run(data: str, iters: int, flags: List[str]) -> Dict:
    """Train ``iters`` steps (world of 1, fp32) with ``flags``; return what was recorded."""
    rec = StepRecorder()
    res = pretrain(base_args(data, iters, *flags), hooks=rec)
    return {"initial": rec.initial, "grads": rec.grads, "weights": rec.weights,
            "grad_norms": rec.grad_norms, "losses": res.losses}
