"""CPU backend: lets Megatron-Core's real code paths run on CPU tensors over gloo.

Megatron-Core assumes CUDA in a few places: it allocates with ``device='cuda'``
(optimizer, grad buffers, pipeline shape exchange), calls ``torch.cuda.current_device()``,
``torch.cuda.synchronize()`` and ``Tensor.cuda()``, checks ``param.type()`` against
``'torch.cuda.FloatTensor'`` and keeps its RNG tracker in CUDA generator states.

:class:`CpuBackend` is a context that installs, only when CUDA is absent:

* a ``TorchFunctionMode`` mapping any cuda device argument to cpu, ``Tensor.cuda`` to a
  no-op and reporting cuda type names from ``Tensor.type()``;
* replacements for ``torch.cuda.current_device`` / ``synchronize`` / ``empty_cache`` /
  ``current_stream`` (the CPU stream, whose waits are no-ops) and the CUDA RNG entry
  points, redirected to the CPU default generator, and for Megatron's private RNG helpers
  (:func:`eve_megatron.mcore_compat.cpu_rng_patches`), so that Megatron's
  ``CudaRNGStatesTracker`` (model-parallel seeds, ``fork()``, activation recomputation)
  keeps working;

and on exit restores every original. Contexts nest: only the outermost one installs and
restores. :func:`activate` enters one for the rest of the process (what entry points
do). On a machine with CUDA, both do nothing.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from eve_megatron import mcore_compat


def _to_cpu_device(device):
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class CudaAsCpuMode(TorchFunctionMode):
    """Function mode that treats every request for a cuda device as the cpu."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda") else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to and args:
            args = tuple(_to_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return func(*args, **kwargs)


def _patches() -> List[Tuple[Any, str, Any]]:
    """``(owner, name, replacement)`` of everything the backend replaces."""
    cuda = torch.cuda
    return [
        (cuda, "current_device", lambda: "cpu"),
        (cuda, "synchronize", lambda *a, **k: None),
        (cuda, "empty_cache", lambda *a, **k: None),
        # 0.19's grad sync waits on the current stream's events: the CPU stream's are no-ops
        (cuda, "current_stream", lambda *a, **k: torch.cpu.current_stream()),
        (cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state()),
        (cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        (cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed))),
        (cuda, "manual_seed_all", lambda seed: torch.default_generator.manual_seed(int(seed))),
    ] + mcore_compat.cpu_rng_patches()


class CpuBackend:
    """``with CpuBackend():`` runs Megatron-Core on CPU inside, leaves torch and Megatron as
    they were on exit. ``active`` tells whether this context installed or joined one."""

    _depth = 0
    _saved: List[Tuple[Any, str, Any]] = []
    _mode: Optional[TorchFunctionMode] = None
    _log_level = logging.NOTSET

    def __init__(self):
        self.active = False

    def __enter__(self) -> "CpuBackend":
        if torch.cuda.is_available():
            return self
        cls = CpuBackend
        if cls._depth == 0:
            patches = _patches()
            cls._saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
            for owner, name, replacement in patches:
                setattr(owner, name, replacement)
            # The CUDA and CPU generators are one generator here, so the tracker's "CPU RNG
            # state changed within GPU RNG context" warning is expected on every dropout.
            logger = logging.getLogger(mcore_compat.RNG_LOGGER)
            cls._log_level = logger.level
            logger.setLevel(logging.ERROR)
            cls._mode = CudaAsCpuMode()
            cls._mode.__enter__()
        cls._depth += 1
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        self.active = False
        cls = CpuBackend
        cls._depth -= 1
        if cls._depth:
            return
        cls._mode.__exit__(None, None, None)
        cls._mode = None
        logging.getLogger(mcore_compat.RNG_LOGGER).setLevel(cls._log_level)
        for owner, name, original in reversed(cls._saved):
            setattr(owner, name, original)
        cls._saved = []


_PROCESS: Optional[CpuBackend] = None


def is_active() -> bool:
    """True while a CPU backend is installed in this process."""
    return CpuBackend._depth > 0


def activate() -> bool:
    """Enter a CPU backend for the rest of the process if CUDA is absent. Idempotent.
    Returns whether it is active."""
    global _PROCESS
    if _PROCESS is None:
        backend = CpuBackend().__enter__()
        if not backend.active:
            return False
        _PROCESS = backend
    return True
