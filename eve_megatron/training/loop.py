"""The training loop: steps over Megatron's pipeline schedules, non-finite step skipping,
periodic checkpoints and reports."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from eve_megatron.training import checkpointing
from eve_megatron.training.config import TrainConfig
from eve_megatron.training.data_setup import StepData
from eve_megatron.training.optim import step_unless_non_finite
from eve_megatron.training.report import Reporter, data_parallel_sum
from eve_megatron.training.state import TrainState, training_extra


class NonFiniteError(RuntimeError):
    """Training stopped: too many non-finite steps in a row, or non-finite weights at a save."""


@dataclass
class StepResult:
    """One optimizer step as every rank sees it."""

    loss: float
    """Mean loss over the supervised tokens of the global batch (NaN off the last stage)."""
    grad_norm: float
    skipped: bool
    """True when the loss or the gradient norm was NaN/Inf: no update was made."""
    pal_loss: Optional[float] = None
    """EVEv1: the PAL loss per image of the global batch (None for other families)."""


@dataclass
class Trainer:
    """Everything one run holds; :meth:`train` runs it to the end."""

    cfg: TrainConfig
    model_config: object
    chunks: List[torch.nn.Module]
    ddp: List[torch.nn.Module]
    optimizer: object
    scheduler: object
    state: TrainState
    stream: object
    forward_step: Callable
    hooks: object = None
    counts: dict = field(default_factory=dict)
    """Trainable / frozen parameter elements of this rank."""
    losses: List[float] = field(default_factory=list)
    """Loss of every iteration this process ran (index 0 = iteration ``start + 1``)."""
    image_settings: dict = field(default_factory=dict)
    """How the training images were prepared (recorded with every checkpoint)."""
    lock: object = None
    """The OS lock on --save this run holds (rank 0), released when the run ends."""
    pending_save: object = None
    """The last save, while its files are hashed in the background (``PendingChecksums``)."""

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"

    def train_step(self, data: StepData) -> StepResult:
        """Forward/backward over the step's micro-batches, then update unless non-finite."""
        for m in self.ddp:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        pal = self._weigh_pal(data)
        iters = data.iterators()
        vp = len(self.ddp) > 1
        # carry_factor: EVEv1's PAL taps ride along at PP > 1; 1 for other models (GPTModel)
        outputs = get_forward_backward_func()(
            forward_step_func=self.forward_step, data_iterator=iters if vp else iters[0],
            model=self.ddp if vp else self.ddp[0], num_microbatches=data.n,
            seq_length=self.cfg.data.seq_length * getattr(self.chunks[0], "carry_factor", 1),
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=False)
        total = torch.zeros(2, dtype=torch.float64, device=self._device())
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        if last:
            for out in outputs:
                total += out["lm loss"].to(total)
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
        loss = float(total[0] / total[1]) if last else float("nan")
        pal_loss = None
        if pal:
            pal_total = torch.zeros(2, dtype=torch.float64, device=self._device())
            for out in outputs if last else ():
                pal_total += out["pal loss"].to(pal_total)
            torch.distributed.all_reduce(pal_total, group=ps.get_data_parallel_group())
            pal_loss = float(pal_total[0] / pal_total[1].clamp_min(1)) if last else float("nan")
            loss_ok = math.isfinite(loss) and math.isfinite(pal_loss)
        else:
            loss_ok = math.isfinite(loss)
        bad = torch.tensor([float(last and not loss_ok)], device=self._device())
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() > 0:
            return StepResult(loss, float("nan"), skipped=True, pal_loss=pal_loss)
        ok, grad_norm = step_unless_non_finite(self.optimizer)
        if not ok:
            return StepResult(loss, grad_norm, skipped=True, pal_loss=pal_loss)
        self.scheduler.step(increment=1)
        return StepResult(loss, grad_norm, skipped=False, pal_loss=pal_loss)

    def _weigh_pal(self, data: StepData) -> bool:
        """EVEv1 batches (with ``teacher_valid``): set every micro-batch's ``pal_weight`` =
        supervised tokens / images of the global batch (data-parallel sum), so the step
        minimises CE per token + PAL per image. Returns whether the step has a PAL."""
        batches = data.prefetch()
        if not batches or "teacher_valid" not in batches[0]:
            return False
        counts = torch.tensor([sum(float(b["loss_mask"].sum()) for b in batches),
                               sum(float(b["teacher_valid"].shape[0]) for b in batches)],
                              dtype=torch.float64, device=self._device())
        torch.distributed.all_reduce(counts, group=ps.get_data_parallel_group())
        weight = float(counts[0] / counts[1].clamp_min(1))
        for b in batches:
            b["pal_weight"] = weight
        return True

    def train(self) -> List[float]:
        """Run from ``state.iteration`` to the end (or ``--exit-interval``); returns the
        losses of the iterations run."""
        cfg, st = self.cfg, self.state
        total = cfg.training.iterations
        n_micro = cfg.num_microbatches(torch.distributed.get_world_size())
        reporter = Reporter(cfg, self.model_config, total, st.iteration)
        consecutive, saved_at = 0, None
        if self.hooks is not None and hasattr(self.hooks, "before_train"):
            self.hooks.before_train(self)
        try:
            while st.iteration < total:
                data = StepData(self.stream, n_micro, len(self.chunks))
                result = self.train_step(data)
                self.finish_save()  # the previous save's checksums, hashed during this step
                st.iteration += 1
                st.consumed_samples += cfg.training.global_batch_size
                st.skipped_iterations += int(result.skipped)
                consecutive = consecutive + 1 if result.skipped else 0
                self.losses.append(result.loss)
                reporter.add(st.iteration, data_parallel_sum(data.stats), result.loss,
                             result.grad_norm, self._lr(), result.skipped,
                             pal_loss=result.pal_loss)
                if self.hooks is not None and hasattr(self.hooks, "after_step"):
                    self.hooks.after_step(self, result)
                if consecutive >= cfg.training.max_consecutive_nonfinite:
                    raise NonFiniteError(
                        f"stopping at iteration {st.iteration}: {consecutive} consecutive "
                        f"iterations with a non-finite loss or gradient norm (each was skipped; "
                        f"max_consecutive_nonfinite={cfg.training.max_consecutive_nonfinite}). "
                        f"Lower --lr, check the data, or resume from the last checkpoint.")
                interval = cfg.checkpoint.save_interval
                if interval and st.iteration % interval == 0:
                    saved_at = self.save()
                exit_now = (cfg.training.exit_interval
                            and st.iteration % cfg.training.exit_interval == 0)
                if exit_now:
                    break
            if cfg.checkpoint.save and saved_at != st.iteration:
                self.save()
            self.finish_save()
        finally:
            reporter.close()
        return self.losses

    def _lr(self) -> float:
        groups = self.optimizer.param_groups
        return float(groups[0]["lr"]) if groups else float("nan")

    def save(self) -> int:
        """Save a checkpoint of the current iteration (refused if any weight is non-finite).
        Its files are hashed in the background; :meth:`finish_save` writes the record."""
        self.finish_save()
        cfg, st = self.cfg, self.state
        bad = torch.zeros(1, device=self._device())
        for chunk in self.chunks:
            for p in chunk.parameters():
                if not torch.isfinite(p).all():
                    bad.fill_(1)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() > 0:
            raise NonFiniteError(f"refusing to save iteration {st.iteration}: the weights hold "
                                 f"NaN/Inf; the latest good checkpoint stays "
                                 f"{checkpointing.latest_iteration(cfg.checkpoint.save)}")
        extra = training_extra(self.optimizer, self.scheduler, st,
                               with_optimizer=not cfg.checkpoint.no_save_optim)
        self.pending_save = checkpointing.start_save(cfg.checkpoint.save, st.iteration,
                                                     self.chunks, extra, images=self.image_settings)
        if torch.distributed.get_rank() == 0:
            print(f"saved checkpoint {self.pending_save.folder}", flush=True)
        return st.iteration

    def finish_save(self) -> None:
        """Collective: wait for the last save's background hashing and write its
        ``SHA256SUMS`` (nothing when no save is pending)."""
        pending, self.pending_save = self.pending_save, None
        if pending is not None:
            pending.finish()
