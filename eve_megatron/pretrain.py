"""Train an EVE model: ``torchrun --nproc-per-node N -m eve_megatron.pretrain --config
RECIPE.yaml [Megatron-LM flags]``.

Single node:   torchrun --nproc-per-node 8 -m eve_megatron.pretrain --config examples/eve7b/stage2.yaml
Multi-node:    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d \\
                   --rdzv-endpoint HOST:29500 --rdzv-id JOB -m eve_megatron.pretrain ...
(see docs/training.md and examples/slurm/). Exit codes: 0 done, 1 training stopped
(non-finite loss/weights), 2 bad configuration.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from eve_megatron.data.indexed import CorruptSampleError
from eve_megatron.outputs import OutputBusyError, lock_on_rank0
from eve_megatron.parallel import initialize_parallel
from eve_megatron.training import checkpointing
from eve_megatron.training.checkpoint_checksums import verify_checkpoint
from eve_megatron.training.arguments import config_to_dict, parse_config
from eve_megatron.training.config import ConfigError, TrainConfig
from eve_megatron.training.data_setup import build_train_stream, check_vocab, data_image_settings
from eve_megatron.training.loop import NonFiniteError, Trainer
from eve_megatron.training.model_setup import build_model_chunks, wrap_ddp
from eve_megatron.training.optim import build_optimizer, build_scheduler, ddp_config
from eve_megatron.training.optim_compat import unshare_adam_steps
from eve_megatron.training.stages import apply_freezing, build_model_config, trainable_set
from eve_megatron.training.state import (TrainState, current_layout, loading_extra,
                                         set_rng_state)
from eve_megatron.training.step import forward_step as default_forward_step


@dataclass
class RunResult:
    """What :func:`pretrain` returns on every rank."""

    iteration: int
    """Iteration reached."""
    start_iteration: int
    """Iteration the run started from (0, or the resumed checkpoint's)."""
    losses: List[float]
    """Loss of each iteration run (iteration ``start_iteration + 1`` first; NaN on ranks
    that are not on the last pipeline stage)."""
    skipped_iterations: int
    trainable: dict
    """Trainable / frozen parameter element counts of this rank."""


def _log(message: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(message, flush=True)


def _checkpoint_to_load(cfg: TrainConfig):
    """``(root, iteration, common state, model fields, finetune)`` to start from: ``--load``
    when it holds a checkpoint, else ``--pretrained-checkpoint`` (as --finetune), else Nones."""
    c = cfg.checkpoint
    if c.load is not None and (c.ckpt_step is not None
                               or checkpointing.latest_iteration(c.load) is not None):
        root, finetune = c.load, c.finetune
    elif c.pretrained_checkpoint is not None:
        root, finetune = c.pretrained_checkpoint, True
    else:
        if c.load is not None:
            _log(f"no checkpoint under {c.load}: starting from scratch")
        return None, None, None, None, False
    step = c.ckpt_step if root == c.load else None
    try:
        if not c.no_checkpoint_verify:  # before anything of it is read
            verify_checkpoint(checkpointing.iteration_dir(root, checkpointing._resolve(root, step)))
        iteration, common = checkpointing.load_common(root, step)
        fields = checkpointing.read_model_fields(root, iteration)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"checkpoint: cannot load {root}: {exc}") from None
    return root, iteration, common, fields, finetune


def setup(cfg: TrainConfig, forward_step_func: Optional[Callable] = None, hooks=None) -> Trainer:
    """Process groups, model (+ freezing), DDP, optimizer, schedule, checkpoint, data."""
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    initialize_parallel(cfg.parallel, seed=cfg.training.seed)
    check_outputs(cfg)
    lock = lock_save(cfg)
    try:
        trainer = build_trainer(cfg, forward_step_func, hooks)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    trainer.lock = lock
    return trainer


def check_outputs(cfg: TrainConfig) -> None:
    """Refuse, before any work, a --save that is a file or holds another run's checkpoints
    (unless it is this run's resume, --load = --save, or --overwrite), and a --load without
    a checkpoint that is not also --save (a typo would otherwise start from scratch)."""
    c = cfg.checkpoint
    same = c.load is not None and c.save is not None and (
        os.path.abspath(c.load) == os.path.abspath(c.save))
    if c.save is not None:
        if os.path.exists(c.save) and not os.path.isdir(c.save):
            raise ConfigError(f"checkpoint: --save {c.save} is a file, not a folder")
        latest = checkpointing.latest_iteration(c.save) if os.path.isdir(c.save) else None
        if latest is not None and not same and not c.overwrite:
            raise ConfigError(f"checkpoint: --save {c.save} already holds another run's "
                              f"checkpoints (latest iteration {latest}); resume it with --load "
                              f"{c.save}, choose another --save, or pass --overwrite")
    if (c.load is not None and not same and c.ckpt_step is None
            and checkpointing.latest_iteration(c.load) is None):
        raise ConfigError(f"checkpoint: --load {c.load} holds no checkpoint "
                          f"({checkpointing.LATEST} missing) and is not --save")


def lock_save(cfg: TrainConfig):
    """Rank 0 holds an OS lock on --save for the whole run (one trainer per folder); every
    rank raises the same ConfigError when another live run holds it."""
    if cfg.checkpoint.save is None:
        return None
    try:
        return lock_on_rank0(cfg.checkpoint.save, "checkpoint root --save")
    except OutputBusyError as exc:
        raise ConfigError(f"checkpoint: {exc}") from None


def build_trainer(cfg: TrainConfig, forward_step_func: Optional[Callable] = None, hooks=None,
                  chunks: Optional[List[torch.nn.Module]] = None, model_config=None) -> Trainer:
    """Everything of :func:`setup` after the process groups. ``chunks``/``model_config``
    replace the EVE model (the training-step benchmark's Megatron GPTModel anchor)."""
    world = torch.distributed.get_world_size()
    root, ckpt_iter, common, fields, finetune = _checkpoint_to_load(cfg)
    if chunks is None:
        model_config = build_model_config(cfg, fields, root)
        chunks = build_model_chunks(model_config)
    check_vocab(cfg, model_config.vocab_size)
    which = trainable_set(cfg)
    counts = apply_freezing(chunks, which)
    ddp = wrap_ddp(chunks, model_config, ddp_config(cfg))
    optimizer = build_optimizer(cfg, ddp)
    scheduler = build_scheduler(cfg, optimizer)
    state = TrainState(layout=current_layout(), config=config_to_dict(cfg))
    if ckpt_iter is not None:
        state = _load(cfg, chunks, optimizer, scheduler, state, root, ckpt_iter, common, finetune)
    _log(f"model: {getattr(model_config, 'decoupling', 'GPT')} decoupling, trainable={which} "
         f"({counts['trainable']:,} trainable / {counts['frozen']:,} frozen elements on rank 0), "
         f"layout {state.layout}, {cfg.num_microbatches(world)} micro-batches per step, "
         f"starting at iteration {state.iteration}")
    stream = build_train_stream(cfg, state.consumed_samples, model_config)
    return Trainer(cfg, model_config, chunks, ddp, optimizer, scheduler, state, stream,
                   forward_step_func or default_forward_step, hooks, counts,
                   image_settings=data_image_settings(cfg))


def _load(cfg, chunks, optimizer, scheduler, state, root, iteration, common,
          finetune) -> TrainState:
    c = cfg.checkpoint
    saved = common.get("train_state")
    resume = saved is not None and not finetune
    with_optim = resume and not c.no_load_optim and "opt_param_scheduler" in common
    same_layout = resume and saved.get("layout") == state.layout
    with_rng = same_layout and not c.no_load_rng
    _, loaded = checkpointing.load_checkpoint(
        root, chunks, iteration, extra=loading_extra(optimizer, with_optim, with_rng),
        verify=False)  # verified by _checkpoint_to_load
    if with_optim:
        if "optimizer" in loaded:
            optimizer.load_state_dict(loaded["optimizer"])
            unshare_adam_steps(optimizer)
        scheduler.load_state_dict(common["opt_param_scheduler"])
    else:
        optimizer.reload_model_params()  # main (fp32) params from the loaded weights
    if with_rng:
        set_rng_state(loaded["rng_state"])
    kind = ("resumed" if resume else "loaded weights only (fresh optimizer, iteration 0) from")
    _log(f"{kind} {checkpointing.iteration_dir(root, iteration)}"
         + ("" if with_optim or not resume else " without optimizer state")
         + ("" if with_rng or not resume else " with fresh RNG states (different layout)"))
    if not resume:
        return state
    return TrainState(iteration=saved["iteration"], consumed_samples=saved["consumed_samples"],
                      skipped_iterations=saved["skipped_iterations"], layout=state.layout,
                      config=state.config)


def pretrain(argv: Optional[Sequence[str]] = None, forward_step_func: Optional[Callable] = None,
             hooks=None) -> RunResult:
    """Parse ``argv`` (recipes + flags), train, return a :class:`RunResult`.

    ``forward_step_func`` replaces :func:`training.step.forward_step`; ``hooks`` may define
    ``before_train(trainer)`` and ``after_step(trainer, step_result)`` (used by tests).
    """
    cfg = parse_config(argv)
    trainer = setup(cfg, forward_step_func, hooks)
    try:
        start = trainer.state.iteration
        losses = trainer.train()
    finally:
        if trainer.lock is not None:
            trainer.lock.release()
    st = trainer.state
    _log(f"done: iteration {st.iteration}, skipped {st.skipped_iterations}")
    return RunResult(st.iteration, start, list(losses), st.skipped_iterations, trainer.counts)


def _error(message: str) -> None:
    """Print on rank 0 only (every rank hits the same error)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"eve_megatron.pretrain: {message}", file=sys.stderr, flush=True)


EXIT_CODES = {0: "done", 1: "stopped", 2: "configuration error"}
"""Our exit codes. torchrun exits 1 for any failed worker; the reason is in the elastic
error file it reads (its "Root Cause" summary) and in the last stderr line."""


def die_with_launcher() -> None:
    """Under torchrun (Linux), have the kernel kill this worker when its launcher dies, so a
    SIGKILLed launcher never leaves workers training and saving."""
    from eve_megatron.launch.lifetime import die_with_parent, forks_die_with_parent

    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    if not die_with_parent():
        os._exit(1)  # the launcher died before the request took effect
    forks_die_with_parent()


def _record(exc: BaseException, code: int) -> None:
    """Our reason where torchrun and schedulers read it: the elastic error file (when torchrun
    set one) and a final status line."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        ErrorHandler().record_exception(exc)
    _error(f"exit {code} ({EXIT_CODES[code]}): {exc}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit code (``EXIT_CODES``)."""
    die_with_launcher()
    try:
        pretrain(argv)
    except ConfigError as exc:
        _record(exc, 2)
        return 2
    except NonFiniteError as exc:
        _record(exc, 1)
        return 1
    except CorruptSampleError as exc:  # a DataLoader worker's error carries its traceback
        reason = str(exc).strip().splitlines()[-1].split("CorruptSampleError: ")[-1]
        _record(CorruptSampleError(f"{reason}; --corrupt-samples skip leaves damaged samples "
                                   "out (counted in the log)"), 1)
        return 1
    finally:
        from eve_megatron.parallel import destroy_parallel

        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
