"""The Megatron-Core compatibility layer: the release check, every private symbol we use
or patch (still there, with the parameters we rely on), and the CPU backend as a context
that restores what it replaced."""

import glob
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from eve_megatron import mcore_compat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("symbol", mcore_compat.PRIVATE_SYMBOLS,
                         ids=lambda s: s.qualname)
def test_private_symbol_exists_with_expected_signature(symbol):
    assert symbol.problem() is None


def test_a_renamed_or_changed_symbol_is_reported():
    gone = mcore_compat.PrivateSymbol(mcore_compat._RANDOM, "_get_cuda_rng_state_v2", ())
    assert "missing" in gone.problem()
    changed = mcore_compat.PrivateSymbol(mcore_compat._RANDOM, "_get_cuda_rng_state",
                                         ("device", "clone"))
    assert "!= expected" in changed.problem()
    wider = mcore_compat.PrivateSymbol(mcore_compat._LAYERS,
                                       "linear_with_frozen_weight", ("input", "renamed"),
                                       exact=False)
    assert "!= expected" in wider.problem()


def test_no_other_module_reaches_a_private_megatron_name():
    private = {s.qualname.split(".")[-1] for s in mcore_compat.PRIVATE_SYMBOLS}
    private = {n for n in private if n.startswith("_")}
    assert "_forward_impl" in private and "_results_queue" in private
    reach = re.compile(r"\.(%s)\b|from megatron[\w.]* import [^\n]*\b_[a-z]" % "|".join(private))
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "eve_megatron", "**", "*.py"), recursive=True):
        if os.path.basename(path) == "mcore_compat.py":
            continue
        with open(path) as f:
            offenders += [f"{os.path.relpath(path, ROOT)}: {m.group(0)}"
                          for m in reach.finditer(f.read())]
    assert not offenders


def test_installed_release_is_supported_and_others_are_named():
    assert mcore_compat.VERSION[:2] in mcore_compat.SUPPORTED
    assert mcore_compat.check_version("0.16.1") == (0, 16, 1)
    assert mcore_compat.check_version("0.19.2") == (0, 19, 2)
    assert mcore_compat.check_version("0.19.0rc1") == (0, 19, 0)
    for bad in ("0.16.0", "0.17.0", "0.18.3", "0.20.0", "1.0.0"):
        with pytest.raises(mcore_compat.UnsupportedMegatronCore, match=bad) as info:
            mcore_compat.check_version(bad)
        assert mcore_compat.SUPPORTED_TEXT in str(info.value)


def test_optimizer_patch_is_installed_once():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    symbol = mcore_compat.PrivateSymbol(*mcore_compat._SET_STATES, ())
    mcore_compat.patch_distributed_optimizer()
    patched = DistributedOptimizer._set_main_param_and_optimizer_states
    original = symbol.original()
    mcore_compat.patch_distributed_optimizer()
    assert DistributedOptimizer._set_main_param_and_optimizer_states is patched
    assert symbol.resolve() is patched
    assert symbol.original() is original is not patched
    assert original.__module__ == mcore_compat._DISTOPT
    assert original.__qualname__ == "DistributedOptimizer._set_main_param_and_optimizer_states"


ENTER_LEAVE = textwrap.dedent("""
    import logging
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mr
    from eve_megatron import cpu_backend, mcore_compat

    names = [(torch.cuda, n) for n in ("current_device", "synchronize", "current_stream",
                                       "get_rng_state", "set_rng_state", "manual_seed",
                                       "manual_seed_all")]
    names += [(mr, "_get_cuda_rng_state"), (mr, "_set_cuda_rng_state")]
    before = [getattr(o, n) for o, n in names]
    level = logging.getLogger(mcore_compat.RNG_LOGGER).level
    assert not cpu_backend.is_active()
    rng = [s for s in mcore_compat.PRIVATE_SYMBOLS if s.module == mr.__name__]
    with cpu_backend.CpuBackend() as outer:
        assert outer.active and cpu_backend.is_active()
        # the signature check looks at Megatron's helpers, not at our replacements
        assert [s.resolve() for s in rng] == [mr._get_cuda_rng_state, mr._set_cuda_rng_state]
        assert [s.original() for s in rng] == before[-2:]
        assert all(s.problem() is None for s in mcore_compat.PRIVATE_SYMBOLS)
        with cpu_backend.CpuBackend():
            pass
        assert torch.zeros(2, device="cuda").device.type == "cpu"  # inner exit left it on
        assert all(getattr(o, n) is not b for (o, n), b in zip(names, before))
        tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            torch.rand(2)
    assert not cpu_backend.is_active()
    assert all(getattr(o, n) is b for (o, n), b in zip(names, before))
    assert logging.getLogger(mcore_compat.RNG_LOGGER).level == level
    assert torch.ones(2).type() == "torch.FloatTensor"
    try:
        torch.zeros(2, device="cuda")
    except (RuntimeError, AssertionError):
        pass
    else:
        raise SystemExit("a cuda tensor was made after the backend was left")
    assert cpu_backend.activate() and cpu_backend.is_active()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    print("ENTER-LEAVE-OK")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cpu_backend_is_entered_and_left():
    # A fresh interpreter: this test process may hold the process-wide backend already.
    out = subprocess.run([sys.executable, "-c", ENTER_LEAVE], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ENTER-LEAVE-OK" in out.stdout
