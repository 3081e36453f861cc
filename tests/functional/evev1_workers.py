"""Rank functions of the EVEv1 training tests: the real trainer (``pretrain``) on EVEv1 data."""

from __future__ import annotations

import torch


class _Record:
    """Trainer hooks: weights before training, (token loss, PAL loss) of every step."""

    def __init__(self):
        self.before, self.losses = {}, []

    def before_train(self, trainer):
        self.before = _weights(trainer)

    def after_step(self, trainer, result):
        self.losses.append((result.loss, result.pal_loss))


def _weights(trainer):
    """Full weights of every model chunk of this rank (global names)."""
    from eve_megatron.models.eve.sharding import gather_full

    out = {}
    for chunk in trainer.chunks:
        out.update(gather_full(chunk))
    return out


def train(argv):
    """Run the trainer; return losses, which full weights changed, and the final weights."""
    from eve_megatron.pretrain import setup

    hooks = _Record()
    trainer = setup(__import__("eve_megatron.training.arguments", fromlist=["x"])
                    .parse_config(argv), hooks=hooks)
    try:
        trainer.train()
    finally:
        if trainer.lock is not None:
            trainer.lock.release()
    after = _weights(trainer)
    changed = {k: not torch.equal(v, after[k]) for k, v in hooks.before.items()}
    return {"losses": hooks.losses, "changed": changed, "after": after,
            "trainable": {n: p.requires_grad for n, p in trainer.chunks[0].named_parameters()}}


def train_many(argvs):
    """:func:`train` once per argv, one after the other in this process."""
    return [train(argv) for argv in argvs]
