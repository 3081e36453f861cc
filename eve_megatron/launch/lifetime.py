"""Processes that do not outlive their parent (Linux ``PR_SET_PDEATHSIG``).

A worker killed together with its launcher must not leave helpers running: torchrun
workers ask for this at start (``eve_megatron.pretrain``), and so do the processes they
fork (Megatron-Core's checkpoint writers) and the multiprocessing manager server that
Megatron-Core's checkpoint writer starts for its results queue, which otherwise serves
forever once its rank is SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; False when the
    parent is already gone (re-parented to init) or the platform has no such request."""
    if not sys.platform.startswith("linux"):
        return True
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
    return os.getppid() != 1


def _forked_child_dies_with_parent() -> None:
    if not die_with_parent():
        os._exit(1)


def forks_die_with_parent() -> None:
    """Make every process this one forks from now on (``os.fork``: e.g. Megatron-Core's
    checkpoint writer processes) ask to die with it too: the request is not inherited."""
    if sys.platform.startswith("linux"):
        os.register_at_fork(after_in_child=_forked_child_dies_with_parent)


def _manager_server_init() -> None:
    if not die_with_parent():
        os._exit(1)


def install_checkpoint_writer_queue() -> None:
    """Give Megatron-Core's async checkpoint writer a results queue whose manager process
    dies with this one (its own would be started on the first save and survive a SIGKILL).
    The queue is a Megatron-Core private global, reached through
    :mod:`eve_megatron.mcore_compat`."""
    from eve_megatron import mcore_compat

    if mcore_compat.checkpoint_results_queue() is not None:
        return  # already created (by us or by Megatron)
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_manager_server_init)
    mcore_compat.set_checkpoint_results_queue(manager.Queue(), keep_alive=manager)
