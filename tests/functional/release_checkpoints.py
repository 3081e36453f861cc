"""Trainer checkpoints across Megatron-Core releases: a tiny run's checkpoint written under
each supported release, stored in ``tests/functional/golden/checkpoints/mcore-X.Y.Z/``
with the losses of the same run uninterrupted.

    python -m tests.functional.release_checkpoints --write   # record the installed release's

Run ``--write`` once per supported release (Python 3.11 for 0.16.1, 3.12 for 0.19.x; it
replaces the stored checkpoint of the installed release's series). Megatron-Core 0.16.1
keeps a checkpoint's common state (iteration, scheduler, ...) in ``common.pt``; 0.19
writes it into the shards and reads both layouts. ``test_release_checkpoints.py`` resumes
every stored checkpoint that the installed release reads and requires the uninterrupted
run's losses; one it cannot read must stop the trainer with
``mcore_compat.CheckpointNeedsNewerMegatronCore`` before anything is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from importlib import metadata
from typing import Dict, List

STORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "checkpoints")
COMMAND = "python -m tests.functional.release_checkpoints --write"
DATA = {"writer": "tests.training_data.write_learnable_dataset", "n": 32, "seed": 11}
ARGS = ["--model-preset", "tiny", "--num-layers", "2", "--hidden-size", "16",
        "--ffn-hidden-size", "32", "--vision-hidden-size", "8", "--vocab-size", "32",
        "--seq-length", "64",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--num-workers", "0",
        "--log-interval", "1", "--no-progress", "--seed", "7"]
"""The run (fp32, one rank): 4 iterations of a 2-layer model small enough to store (the
checkpoint holds the model, the distributed optimizer's state, scheduler, RNG and data
position)."""
SAVED_AT = 2
"""The stored checkpoint is the run's iteration 2; resuming it runs iterations 3 and 4."""
RUN_JSON = "run.json"


def _args(data: str, *extra) -> List[str]:
    return [*ARGS, "--data-path", data, *map(str, extra)]


def write_run(data: str, root: str) -> List[float]:
    """Rank function: the uninterrupted run's losses, then the run again, saved at
    :data:`SAVED_AT` and stopped there, into ``root``."""
    import torch

    from eve_megatron.pretrain import pretrain

    torch.set_num_threads(1)
    full = pretrain(_args(data)).losses
    pretrain(_args(data, "--save", root, "--save-interval", SAVED_AT,
                   "--exit-interval", SAVED_AT))
    return full


def resume_run(data: str, root: str) -> Dict:
    """Rank function: resume the checkpoint under ``root`` to the end of the run."""
    import torch

    from eve_megatron.pretrain import pretrain

    torch.set_num_threads(1)
    result = pretrain(_args(data, "--load", root))
    return {"start": result.start_iteration, "losses": result.losses}


def _with_data(target: str, **kwargs):
    from eve_megatron.launch import run_distributed
    from tests import training_data

    writer = getattr(training_data, DATA["writer"].rsplit(".", 1)[1])
    with tempfile.TemporaryDirectory(prefix="eve_release_ckpt_") as tmp:
        prefix = writer(os.path.join(tmp, "data"), **{k: v for k, v in DATA.items()
                                                      if k != "writer"})
        return run_distributed(target, 1, data=prefix, **kwargs)[0]


def stored() -> Dict[str, Dict]:
    """``{release: run.json}`` of every stored checkpoint (its folder: ``folder(release)``)."""
    out = {}
    for name in sorted(os.listdir(STORE)) if os.path.isdir(STORE) else []:
        path = os.path.join(STORE, name, RUN_JSON)
        if name.startswith("mcore-") and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out[name[len("mcore-"):]] = json.load(f)
    return out


def folder(release: str) -> str:
    return os.path.join(STORE, f"mcore-{release}")


def resume(release: str) -> Dict:
    """Resume a copy of the stored checkpoint of ``release`` under the installed one."""
    with tempfile.TemporaryDirectory(prefix="eve_release_resume_") as tmp:
        root = os.path.join(tmp, "ckpt")
        shutil.copytree(folder(release), root)
        return _with_data("tests.functional.release_checkpoints:resume_run", root=root)


def write() -> str:
    """Record the installed release's checkpoint (replacing its series' old one)."""
    from eve_megatron import mcore_compat

    import torch

    release = metadata.version("megatron-core")
    for old in stored():
        if mcore_compat.parse_version(old)[:2] == mcore_compat.VERSION[:2]:
            shutil.rmtree(folder(old))
    out = folder(release)
    with tempfile.TemporaryDirectory(prefix="eve_release_write_") as tmp:
        root = os.path.join(tmp, "ckpt")
        losses = _with_data("tests.functional.release_checkpoints:write_run", root=root)
        for name in os.listdir(root):
            if name.endswith(".lock"):
                os.remove(os.path.join(root, name))
        shutil.copytree(root, out)
    run = {"command": COMMAND, "megatron-core": release,
           "torch": torch.__version__.split("+")[0], "python": sys.version.split()[0],
           "data": DATA, "args": ARGS, "saved_at": SAVED_AT, "losses": losses}
    with open(os.path.join(out, RUN_JSON), "w", encoding="utf-8") as f:
        json.dump(run, f, indent=1)
        f.write("\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true",
                   help=f"record the installed release's checkpoint under {STORE}")
    a = p.parse_args(argv)
    if a.write:
        print(f"wrote {write()}")
        return 0
    for release in stored():
        print(release, json.dumps(resume(release)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
