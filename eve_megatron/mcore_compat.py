"""The one module through which eve_megatron reaches Megatron-Core's private names.

Supported releases: 0.16.1 (Python 3.11, CI's default) and 0.19.x (which needs Python >=
3.12; CI's second pass). Importing this module checks the installed release and stops
with a clear error on any other. What it covers:

* ``tensor_parallel.random._get/_set_cuda_rng_state``: replaced by the CPU backend
  (:func:`cpu_rng_patches`) so Megatron's RNG tracker runs on the CPU generator;
* ``ColumnParallelLinear/RowParallelLinear._forward_impl``: the branch linears' matmul with
  fused weight-gradient accumulation and no communication (:func:`local_linear`);
* ``DistributedOptimizer._set_main_param_and_optimizer_states``: patched to load a
  checkpoint into torch Adam (:func:`patch_distributed_optimizer`);
* ``DistributedOptimizer._init_optimizer_states_with_dummy_values``: allocating optimizer
  state before a load (:func:`init_optimizer_states`);
* ``dist_checkpointing.strategies.filesystem_async._results_queue``: the async checkpoint
  writer's queue (:func:`checkpoint_results_queue`, :func:`set_checkpoint_results_queue`).

:data:`PRIVATE_SYMBOLS` lists each with the parameters we rely on;
``tests/unit/test_mcore_compat.py`` checks them against the installed release (Megatron's
own functions, recorded before we first replace them, not our replacements).

And the one difference between the releases that reaches our users: 0.19 writes a
checkpoint's common state into its shards, not into ``common.pt``; it reads both layouts,
0.16.1 only its own (:func:`check_checkpoint_layout` says so before a load fails deep in
Megatron). The numerics are the same: under one torch both releases train bit for bit alike.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Dict, List, Optional, Tuple

import torch

SUPPORTED = {(0, 16): (0, 16, 1), (0, 19): (0, 19, 0)}
"""Supported ``(major, minor)`` series and the lowest release of each."""
SUPPORTED_TEXT = "0.16.1 (Python < 3.12) or >=0.19,<0.20 (Python >= 3.12)"


class UnsupportedMegatronCore(ImportError):
    """The installed megatron-core is not a release eve_megatron supports."""


def parse_version(text: str) -> Tuple[int, int, int]:
    """``'0.19.2'`` -> ``(0, 19, 2)`` (pre/post/local parts dropped)."""
    from packaging.version import Version

    release = Version(text).release + (0, 0)
    return release[0], release[1], release[2]


def check_version(version: Optional[str] = None) -> Tuple[int, int, int]:
    """The installed (or given) megatron-core release as a tuple; raises
    :class:`UnsupportedMegatronCore` naming it and the supported range otherwise."""
    if version is None:
        try:
            version = metadata.version("megatron-core")
        except metadata.PackageNotFoundError:
            import megatron.core

            version = megatron.core.__version__
    parsed = parse_version(version)
    lowest = SUPPORTED.get(parsed[:2])
    if lowest is None or parsed < lowest:
        raise UnsupportedMegatronCore(
            f"megatron-core {version} is installed; eve_megatron supports {SUPPORTED_TEXT}. "
            f"Reinstall with: pip install -e . (setup.py picks the release for this Python)")
    return parsed


VERSION = check_version()
"""The installed megatron-core release, checked at import."""


@dataclass(frozen=True)
class PrivateSymbol:
    """A private Megatron-Core function we call or replace, and the parameters we rely on
    (``exact``: its parameter names must be these, in order; else they must include them)."""

    module: str
    qualname: str
    params: Tuple[str, ...]
    exact: bool = True

    def resolve(self) -> Any:
        """The live object (AttributeError when the release renamed or removed it): our
        replacement while one is installed."""
        obj = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj

    def original(self) -> Any:
        """Megatron-Core's own object: the one recorded before we first replaced it, else
        the live one."""
        key = (self.module, self.qualname)
        return _ORIGINALS[key] if key in _ORIGINALS else self.resolve()

    def problem(self) -> Optional[str]:
        """None when Megatron-Core's own symbol (not our replacement of it) exists with the
        expected parameters, else what differs."""
        try:
            obj = self.original()
        except (AttributeError, ImportError) as exc:
            return f"{self.module}.{self.qualname} is missing ({exc})"
        if not callable(obj):
            return None if not self.params else f"{self.qualname} is not callable"
        names = tuple(inspect.signature(obj).parameters)
        ok = names == self.params if self.exact else set(self.params) <= set(names)
        return None if ok else f"{self.qualname}{names} != expected {self.params}"


_ORIGINALS: Dict[Tuple[str, str], Any] = {}
"""``(module, qualname) -> object`` of each private symbol as Megatron-Core defined it,
recorded just before this module (or the CPU backend through it) first replaces it."""


def _record_original(module: str, qualname: str) -> Any:
    """Megatron-Core's own ``module.qualname``, recorded on the first call (later calls
    may find our replacement installed and return the recorded original)."""
    key = (module, qualname)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = PrivateSymbol(module, qualname, ()).resolve()
    return _ORIGINALS[key]


_RANDOM = "megatron.core.tensor_parallel.random"
_LAYERS = "megatron.core.tensor_parallel.layers"
_DISTOPT = "megatron.core.optimizer.distrib_optimizer"
_FSASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_LINEAR_KWARGS = ("input", "weight", "bias", "gradient_accumulation_fusion", "allreduce_dgrad",
                  "sequence_parallel", "grad_output_buffer", "tp_group")
"""What :func:`local_linear` passes to ``_forward_impl`` (which forwards it to one of the two
functions below, depending on ``weight.requires_grad``)."""

PRIVATE_SYMBOLS: Tuple[PrivateSymbol, ...] = (
    PrivateSymbol(_RANDOM, "_get_cuda_rng_state", ("device", "clone", "graph_safe")),
    PrivateSymbol(_RANDOM, "_set_cuda_rng_state", ("new_state", "device", "graph_safe")),
    PrivateSymbol(_LAYERS, "ColumnParallelLinear._forward_impl",
                  ("self", "input", "weight", "args", "kwargs")),
    PrivateSymbol(_LAYERS, "RowParallelLinear._forward_impl",
                  ("self", "input", "weight", "args", "kwargs")),
    PrivateSymbol(_LAYERS, "linear_with_grad_accumulation_and_async_allreduce", _LINEAR_KWARGS,
                  exact=False),
    PrivateSymbol(_LAYERS, "linear_with_frozen_weight", _LINEAR_KWARGS, exact=False),
    PrivateSymbol(_DISTOPT, "DistributedOptimizer._set_main_param_and_optimizer_states",
                  ("self", "model_param", "tensors")),
    PrivateSymbol(_DISTOPT, "DistributedOptimizer._init_optimizer_states_with_dummy_values",
                  ("self",)),
    PrivateSymbol(_FSASYNC, "_results_queue", ()),
)


def cpu_rng_patches() -> List[Tuple[Any, str, Any]]:
    """``(owner, name, replacement)`` for Megatron's CUDA RNG state helpers: on CPU the
    tracker's states are the CPU default generator's."""
    random = importlib.import_module(_RANDOM)
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        _record_original(_RANDOM, name)
    return [(random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()),
            (random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))]


RNG_LOGGER = _RANDOM
"""Logger of Megatron's RNG tracker (warns on every fork when CPU and CUDA RNG are one)."""


def local_linear(linear, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``linear``'s own matmul through Megatron's autograd function (fused weight-gradient
    accumulation into ``main_grad``), with no tensor-parallel communication."""
    return linear._forward_impl(
        input=x, weight=linear.weight, bias=bias,
        gradient_accumulation_fusion=linear.gradient_accumulation_fusion,
        allreduce_dgrad=False, sequence_parallel=False, grad_output_buffer=None, tp_group=None)


def _set_states_without_step(self, model_param, tensors: Dict[str, torch.Tensor]) -> None:
    """Megatron's ``_set_main_param_and_optimizer_states`` for a torch Adam, whose state has
    a ``step`` the checkpoint's per-parameter tensors lack (it comes from the param groups):
    copies the param and every tensor state but ``step``."""
    if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return _ORIGINALS[_SET_STATES](self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    main_param.detach().copy_(tensors["param"])
    for key, value in self.optimizer.state[main_param].items():
        if key != "step" and isinstance(value, torch.Tensor):
            value.copy_(tensors[key])


_SET_STATES = (_DISTOPT, "DistributedOptimizer._set_main_param_and_optimizer_states")


def patch_distributed_optimizer() -> None:
    """Let Megatron's DistributedOptimizer load its state into torch Adam/AdamW (what runs
    without Apex and Transformer Engine). Idempotent; kept for the process."""
    _record_original(*_SET_STATES)
    cls = importlib.import_module(_DISTOPT).DistributedOptimizer
    cls._set_main_param_and_optimizer_states = _set_states_without_step


def init_optimizer_states(optimizer) -> bool:
    """Allocate ``optimizer``'s (a Megatron optimizer's) torch state by its zero-gradient
    step; False when this optimizer class has no such step."""
    init = getattr(optimizer, "_init_optimizer_states_with_dummy_values", None)
    if init is None:
        return False
    init()
    return True


COMMON_STATE_FILE = "common.pt"
"""Where Megatron-Core 0.16 keeps a checkpoint's common (non-sharded) state. 0.19 writes it
into the shards instead (a ``common_state`` object) and reads both layouts."""
READS_COMMON_IN_SHARDS = VERSION >= (0, 19, 0)


class CheckpointNeedsNewerMegatronCore(RuntimeError):
    """The checkpoint's layout is newer than the installed Megatron-Core reads."""


def check_checkpoint_layout(path: str) -> None:
    """Raise :class:`CheckpointNeedsNewerMegatronCore` naming the cause when the installed
    release cannot read the ``dist_checkpointing`` folder ``path``: one written under 0.19
    (common state in the shards, no ``common.pt``) read under 0.16. A 0.16 checkpoint reads
    under 0.19 as it is."""
    if READS_COMMON_IN_SHARDS or os.path.exists(os.path.join(path, COMMON_STATE_FILE)):
        return
    if not os.path.exists(os.path.join(path, ".metadata")):
        return  # not a torch_dist checkpoint: Megatron's own error names what is missing
    raise CheckpointNeedsNewerMegatronCore(
        f"{path} was written by megatron-core >= 0.19 (its common state is inside the shards, "
        f"there is no {COMMON_STATE_FILE}); the installed megatron-core "
        f"{'.'.join(map(str, VERSION))} cannot read it. Load it with Python >= 3.12 and "
        f"megatron-core 0.19.x (pip install -e . there).")


def checkpoint_results_queue():
    """The async checkpoint writer's results queue (None before one exists)."""
    return getattr(importlib.import_module(_FSASYNC), "_results_queue", None)


def set_checkpoint_results_queue(queue, keep_alive: Any = None) -> None:
    """Make ``queue`` the async checkpoint writer's results queue; ``keep_alive`` (its
    manager) lives as long as the module."""
    module = importlib.import_module(_FSASYNC)
    module._results_queue = queue
    module._eve_manager = keep_alive
