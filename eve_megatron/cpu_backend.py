"""CPU backend: lets Megatron-Core's real code paths run on CPU tensors over gloo.

Megatron-Core 0.16.1 assumes CUDA in a few places: it allocates with ``device='cuda'``
(optimizer, grad buffers, pipeline shape exchange), calls ``torch.cuda.current_device()``,
``torch.cuda.synchronize()`` and ``Tensor.cuda()``, checks ``param.type()`` against
``'torch.cuda.FloatTensor'`` and keeps its RNG tracker in CUDA generator states.

:func:`activate` installs, only when CUDA is absent:

* a ``TorchFunctionMode`` mapping any cuda device argument to cpu, ``Tensor.cuda`` to a
  no-op and reporting cuda type names from ``Tensor.type()``;
* stubs for ``torch.cuda.current_device`` / ``synchronize`` / ``empty_cache`` and the CUDA
  RNG entry points, which are redirected to the CPU default generator so that
  Megatron's ``CudaRNGStatesTracker`` (model-parallel seeds, ``fork()``, activation
  recomputation) keeps working.

On a machine with CUDA, :func:`activate` does nothing.
"""

from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

_MODE: TorchFunctionMode | None = None


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


def is_active() -> bool:
    """True when the CPU backend has been installed in this process."""
    return _MODE is not None


def activate() -> bool:
    """Install the CPU backend if CUDA is absent. Idempotent. Returns whether it is active."""
    global _MODE
    if _MODE is not None:
        return True
    if torch.cuda.is_available():
        return False

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # The CUDA and CPU generators are one generator here, so the tracker's "CPU RNG state
    # changed within GPU RNG context" warning is expected on every dropout inside fork().
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)

    _MODE = CudaAsCpuMode()
    _MODE.__enter__()
    return True
