"""Rank functions of the launcher tests."""

import os

import torch


def where_am_i() -> dict:
    """This rank's view after the launcher started it."""
    cuda = torch.cuda.is_available()
    return {"rank": torch.distributed.get_rank(), "local_rank": int(os.environ["LOCAL_RANK"]),
            "backend": torch.distributed.get_backend(),
            "device": torch.cuda.current_device() if cuda else None}
