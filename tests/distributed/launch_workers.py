"""Rank functions of the launcher tests."""

import os

import torch


def where_am_i() -> dict:
    """This rank's view after the launcher started it."""
    cuda = torch.cuda.is_available()
    return {"rank": torch.distributed.get_rank(), "local_rank": int(os.environ["LOCAL_RANK"]),
            "backend": torch.distributed.get_backend(),
            "device": torch.cuda.current_device() if cuda else None}


def helper_then_die(pid_file: str) -> None:
    """Start the checkpoint writer's manager process, record its pid, then die by SIGKILL."""
    import signal

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    from eve_megatron.launch.lifetime import install_checkpoint_writer_queue

    install_checkpoint_writer_queue()
    with open(pid_file, "w") as f:
        f.write(str(fa._eve_manager._process.pid))
    os.kill(os.getpid(), signal.SIGKILL)
