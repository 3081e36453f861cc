"""Training configuration: one validated dataclass per concern, with Megatron-LM flag names.

Every field is declared with :func:`arg`, which records its help text and (when it
differs from ``--field-name``) its Megatron-LM flag. ``arguments.py`` builds the command
line and reads recipe YAML files from these declarations, so the dataclasses are the one
place where options are defined and documented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import List, Optional

from eve_megatron.models.eve.core_attention import ATTENTION_BACKENDS
from eve_megatron.parallel import ParallelConfig


class ConfigError(ValueError):
    """A bad option: unknown key, wrong type or impossible value (the message names it)."""


def arg(default, help: str, flag: Optional[str] = None, choices=None, **kwargs):
    """A dataclass field carrying its CLI help, flag and allowed values."""
    meta = {"help": help, "flag": flag, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kwargs)
    return field(default=default, metadata=meta, **kwargs)


def _check(ok: bool, section: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{section}: {message}")


FLOAT32_MAX = 3.4028234663852886e38
STAGES = ("0", "1.0", "1.1", "2", "3")
TRAINABLE = ("patch_embedding", "vision", "all")


@dataclass
class ModelArgs:
    """Which model: a preset plus architecture overrides, precision and recomputation."""

    preset: Optional[str] = arg(None, "architecture preset (tiny, qwen2.5-0.5b, qwen2.5-1.5b, "
                                "qwen2.5-7b, eve-7b-hd-v2.0); ignored when --load has one",
                                flag="--model-preset")
    decoupling: Optional[str] = arg(None, "vision copies: none (stage 0), mlp, all (default: the "
                                    "checkpoint's, else the stage's)", choices=("none", "mlp", "all"))
    num_layers: Optional[int] = arg(None, "override the preset's decoder layers")
    hidden_size: Optional[int] = arg(None, "override the preset's hidden size")
    ffn_hidden_size: Optional[int] = arg(None, "override the preset's MLP width")
    num_attention_heads: Optional[int] = arg(None, "override the preset's query heads")
    num_query_groups: Optional[int] = arg(None, "override the preset's key/value heads")
    vision_hidden_size: Optional[int] = arg(None, "override the patch embedding width C")
    vocab_size: Optional[int] = arg(None, "override the (padded) vocabulary size")
    max_position_embeddings: Optional[int] = arg(None, "largest position + 1 (default: preset)")
    transformer_impl: str = arg("local", "layer backend", choices=("local", "transformer_engine"))
    attention_backend: str = arg("auto", "attention kernel over the packed samples: te (TE fused, "
                                 "with --transformer-impl transformer_engine), flash_attn, "
                                 "torch_varlen (torch's flash varlen, GPU), flex "
                                 "(FlexAttention), sdpa; auto = te > flash_attn > torch_varlen "
                                 "> flex on GPU, sdpa on CPU", choices=ATTENTION_BACKENDS)
    bf16: bool = arg(False, "bf16 parameters and compute (fp32 main weights in the optimizer)")
    fp8_format: Optional[str] = arg(None, "FP8 GEMMs through Transformer Engine (GPU only)",
                                    choices=("e4m3", "hybrid"))
    recompute_granularity: Optional[str] = arg(None, "activation recomputation",
                                               choices=("full", "selective"))
    recompute_method: Optional[str] = arg(None, "with full recompute: which layers",
                                          choices=("uniform", "block"))
    recompute_num_layers: Optional[int] = arg(None, "layers per recompute unit (full recompute)")
    init_method_std: float = arg(0.02, "std of the normal weight initialisation")
    hidden_dropout: float = arg(0.0, "dropout after attention and MLP")
    attention_dropout: float = arg(0.0, "dropout on attention probabilities")

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an impossible combination."""
        _check(self.fp8_format is None or self.transformer_impl == "transformer_engine", "model",
               "--fp8-format needs --transformer-impl transformer_engine")
        _check(self.attention_backend != "te" or self.transformer_impl == "transformer_engine",
               "model", "--attention-backend te needs --transformer-impl transformer_engine")

        _check(self.recompute_method is None or self.recompute_granularity == "full", "model",
               "--recompute-method needs --recompute-granularity full")
        _check(self.recompute_granularity != "full" or self.recompute_method is not None, "model",
               "--recompute-granularity full needs --recompute-method uniform|block")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vision_hidden_size", "vocab_size",
                     "max_position_embeddings", "recompute_num_layers"):
            value = getattr(self, name)
            _check(value is None or value > 0, "model", f"{name} must be positive, got {value}")
        _check(0.0 <= self.hidden_dropout < 1 and 0.0 <= self.attention_dropout < 1, "model",
               "dropout probabilities must be in [0, 1)")


@dataclass
class DataArgs:
    """Which data and how it is cut into rows."""

    data_path: List[str] = arg([], "Megatron --data-path: PREFIX or W1 PREFIX1 W2 PREFIX2 ...")
    seq_length: int = arg(4096, "tokens per packed row")
    tokenizer_model: Optional[str] = arg(None, "HF tokenizer folder or sentencepiece .model "
                                         "(checks that its vocabulary fits the model)")
    num_workers: int = arg(2, "DataLoader worker processes per rank (decode images)")
    shuffle_window: int = arg(10000, "samples per best-fit packing window")
    corrupt_samples: str = arg("stop", "a dataset sample whose checksum does not match: stop "
                               "naming its file and index, or skip it and count it in the log",
                               choices=("stop", "skip"))

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an impossible combination."""
        _check(bool(self.data_path), "data", "--data-path is required")
        _check(self.seq_length >= 2, "data", f"seq_length must be >= 2, got {self.seq_length}")
        _check(self.num_workers >= 0, "data", "num_workers must be >= 0")
        _check(self.shuffle_window >= 1, "data", "shuffle_window must be >= 1")


@dataclass
class TrainingArgs:
    """How long, how big the batches, which parameters learn."""

    stage: Optional[str] = arg(None, "EVEv2 stage (0, 1.0, 1.1, 2, 3): sets the trainable set "
                               "and checks the decoupling", choices=STAGES)
    trainable: Optional[str] = arg(None, "patch_embedding, vision (= patch embedding + vision "
                                   "copies) or all (default: from --stage, else all)",
                                   choices=TRAINABLE)
    micro_batch_size: int = arg(1, "rows per micro-batch per data-parallel rank")
    global_batch_size: int = arg(1, "rows per optimizer step (all ranks, all micro-batches)")
    train_iters: Optional[int] = arg(None, "optimizer steps of the whole run")
    train_samples: Optional[int] = arg(None, "rows of the whole run (instead of --train-iters)")
    seed: int = arg(1234, "seed of initialisation, dropout and data order")
    exit_interval: Optional[int] = arg(None, "save and exit after an iteration divisible by this")
    max_consecutive_nonfinite: int = arg(3, "stop after this many iterations in a row whose "
                                         "loss or grad norm is NaN/Inf (each is skipped)")

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an impossible combination."""
        _check((self.train_iters is None) != (self.train_samples is None), "training",
               "give exactly one of --train-iters and --train-samples")
        _check(self.micro_batch_size >= 1 and self.global_batch_size >= 1, "training",
               "batch sizes must be >= 1")
        _check(self.max_consecutive_nonfinite >= 1, "training",
               "max_consecutive_nonfinite must be >= 1")
        _check(self.exit_interval is None or self.exit_interval >= 1, "training",
               "exit_interval must be >= 1")

    @property
    def iterations(self) -> int:
        """Optimizer steps of the whole run."""
        if self.train_iters is not None:
            return self.train_iters
        return self.train_samples // self.global_batch_size


@dataclass
class OptimizerArgs:
    """Megatron-Core optimizer (distributed Adam/AdamW) and LR schedule."""

    optimizer: str = arg("adam", "adam (decoupled weight decay = AdamW unless "
                         "--no-decoupled-weight-decay) or adamw (alias)", choices=("adam", "adamw"))
    lr: float = arg(1e-4, "peak learning rate")
    min_lr: float = arg(0.0, "learning rate at the end of the decay")
    lr_decay_style: str = arg("cosine", "decay after warmup",
                              choices=("cosine", "linear", "constant", "inverse-square-root"))
    lr_warmup_fraction: Optional[float] = arg(None, "warmup as a fraction of the decay iterations")
    lr_warmup_iters: int = arg(0, "warmup iterations (when no --lr-warmup-fraction)")
    lr_decay_iters: Optional[int] = arg(None, "iterations of warmup + decay (default: all)")
    weight_decay: float = arg(0.0, "weight decay")
    decoupled_weight_decay: bool = arg(True, "AdamW-style weight decay")
    adam_beta1: float = arg(0.9, "Adam beta1")
    adam_beta2: float = arg(0.95, "Adam beta2")
    adam_eps: float = arg(1e-8, "Adam epsilon")
    clip_grad: float = arg(1.0, "clip the global gradient norm to this (0: off)")
    use_distributed_optimizer: bool = arg(True, "shard optimizer state over data-parallel ranks")
    overlap_grad_reduce: bool = arg(False, "overlap the gradient reduce-scatter with backward")

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an impossible combination."""
        _check(self.lr > 0 and 0 <= self.min_lr <= self.lr, "optimizer",
               f"need 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")
        for name in ("lr", "min_lr", "weight_decay", "clip_grad", "adam_eps"):
            value = getattr(self, name)
            _check(math.isfinite(value) and abs(value) <= FLOAT32_MAX, "optimizer",
                   f"{name}={value} is not a finite float32 value (the optimizer works in fp32)")
        _check(self.lr_warmup_fraction is None or 0 <= self.lr_warmup_fraction <= 1, "optimizer",
               "lr_warmup_fraction must be in [0, 1]")
        _check(self.lr_warmup_iters >= 0, "optimizer", "lr_warmup_iters must be >= 0")
        _check(self.weight_decay >= 0 and self.clip_grad >= 0, "optimizer",
               "weight_decay and clip_grad must be >= 0")
        _check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "optimizer",
               "Adam betas must be in [0, 1)")


@dataclass
class CheckpointArgs:
    """Where checkpoints go and what a load restores."""

    save: Optional[str] = arg(None, "checkpoint folder to save into")
    load: Optional[str] = arg(None, "checkpoint folder to start from (resume, or a previous "
                              "stage / converted model with --finetune)")
    pretrained_checkpoint: Optional[str] = arg(None, "weights to start from when --load holds "
                                               "no checkpoint (loaded like --finetune); lets a "
                                               "stage restart with --load = --save")
    save_interval: Optional[int] = arg(None, "save every this many iterations (and at the end)")
    ckpt_step: Optional[int] = arg(None, "load this iteration instead of the latest")
    finetune: bool = arg(False, "load model weights only: iteration 0, fresh optimizer, "
                         "schedule and data position")
    no_load_optim: bool = arg(False, "do not restore optimizer and LR schedule")
    no_load_rng: bool = arg(False, "do not restore RNG states")
    no_save_optim: bool = arg(False, "save model weights only")
    overwrite: bool = arg(False, "let --save hold another run's checkpoints (new saves move its "
                          "latest marker); without it such a --save is refused")
    no_checkpoint_verify: bool = arg(False, "load without checking the checkpoint's files against "
                                     "its SHA256SUMS (checked by default, all ranks sharing "
                                     "the reading)")

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an impossible combination."""
        _check(self.save_interval is None or self.save_interval >= 1, "checkpoint",
               "save_interval must be >= 1")
        _check(self.save_interval is None or self.save is not None, "checkpoint",
               "--save-interval needs --save")


@dataclass
class LoggingArgs:
    """What is reported and where."""

    log_interval: int = arg(10, "report every this many iterations")
    tensorboard_dir: Optional[str] = arg(None, "write TensorBoard scalars here (last rank)")
    peak_tflops: Optional[float] = arg(None, "peak dense TFLOP/s per GPU for MFU "
                                       "(default: known GPUs in bf16)")
    progress: bool = arg(True, "show a progress bar on the logging rank")

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an impossible combination."""
        _check(self.log_interval >= 1, "logging", "log_interval must be >= 1")


SECTIONS = {"model": ModelArgs, "parallel": ParallelConfig, "data": DataArgs,
            "training": TrainingArgs, "optimizer": OptimizerArgs, "checkpoint": CheckpointArgs,
            "logging": LoggingArgs}
"""Recipe sections and their dataclasses (``parallel`` is :class:`ParallelConfig`)."""


@dataclass
class TrainConfig:
    """The whole run: one dataclass per concern."""

    model: ModelArgs = field(default_factory=ModelArgs)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataArgs = field(default_factory=DataArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)

    def validate(self, world_size: Optional[int] = None) -> None:
        """Validate every section, then the cross-section rules (batch sizes vs layout)."""
        for f in fields(self):
            section = getattr(self, f.name)
            try:
                section.validate(world_size) if f.name == "parallel" else section.validate()
            except ConfigError:
                raise
            except ValueError as exc:
                raise ConfigError(f"{f.name}: {exc}") from None
        if world_size is not None:
            t = self.training
            dp = self.parallel.data_parallel_size(world_size)
            _check(t.global_batch_size % (t.micro_batch_size * dp) == 0, "training",
                   f"global_batch_size {t.global_batch_size} must be divisible by "
                   f"micro_batch_size {t.micro_batch_size} x data-parallel size {dp}")
        _check(self.training.iterations >= 0, "training", "the run has a negative length")

    def num_microbatches(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        dp = self.parallel.data_parallel_size(world_size)
        return self.training.global_batch_size // (self.training.micro_batch_size * dp)
