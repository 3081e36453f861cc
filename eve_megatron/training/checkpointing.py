"""Distributed checkpoints: Megatron-Core ``dist_checkpointing`` in an atomic directory layout.

    SAVE/latest_checkpointed_iteration.txt   the newest complete checkpoint ("100")
    SAVE/iter_0000100/                       dist_checkpointing shards + common state
                                             (common.pt under Megatron-Core 0.16; 0.19
                                             keeps it in the shards and reads both)
    SAVE/iter_0000100/eve_model.json         the architecture (models.eve.config.MODEL_FIELDS)
    SAVE/iter_0000100/eve_images.json        how its images were prepared (when known):
                                             {"max_image_size": 1600, "alpha": "drop"}

A checkpoint is written under ``iter_XXXXXXX.tmp``, every file and folder of it flushed to
stable storage, and renamed once every rank has finished; the ``latest`` marker is replaced
(write, flush, rename, flush the folder) only after that, so a crash, a kill or a power
loss during a save leaves the previous checkpoint complete and marked latest. Any
tensor/pipeline/virtual-pipeline/data-parallel layout can load any other's checkpoint.

    SAVE/iter_0000100/SHA256SUMS             every file's SHA-256 (``sha256sum -c`` format)

is written after the rename, by the ranks hashing in the background
(``checkpoint_checksums.py``), and verified before every load: a flipped byte in any
shard, the common state or the metadata is an error naming the file.

The state dict holds ``model`` (``model0``, ``model1``, ... for virtual pipeline chunks)
and whatever the caller adds through ``extra`` (optimizer, scheduler, RNG, data position:
see ``training/state.py``). A checkpoint without them (e.g. written by a conversion tool)
is a "model-only" checkpoint that the trainer loads as a fresh start.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from megatron.core import dist_checkpointing

from eve_megatron import mcore_compat
from eve_megatron.models.eve.config import model_fields
from eve_megatron.launch.lifetime import install_checkpoint_writer_queue
from eve_megatron.training.checkpoint_checksums import PendingChecksums, verify_checkpoint
from eve_megatron.outputs import fsync_dir, fsync_tree

LATEST = "latest_checkpointed_iteration.txt"
MODEL_JSON = "eve_model.json"
IMAGES_JSON = "eve_images.json"
IMAGE_KEYS = ("max_image_size", "alpha")
"""What ``IMAGES_JSON`` holds: the AnyRatio size and the alpha rule of the training images
(the data's metadata), carried through import, training, copy and export."""


def iteration_dir(root: str, iteration: int) -> str:
    """``root/iter_0000100`` for iteration 100."""
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    """The newest complete checkpoint under ``root``, or None."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def read_model_fields(root: str, iteration: Optional[int] = None) -> dict:
    """The architecture recorded with a checkpoint (default: the latest)."""
    iteration = _resolve(root, iteration)
    with open(os.path.join(iteration_dir(root, iteration), MODEL_JSON)) as f:
        return json.load(f)


def read_image_settings(root: str, iteration: Optional[int] = None) -> Dict:
    """The image settings recorded with a checkpoint (``{}`` when none were recorded)."""
    path = os.path.join(iteration_dir(root, _resolve(root, iteration)), IMAGES_JSON)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict:
    """``{"model": ...}`` or ``{"model0": ..., "model1": ...}`` for virtual pipeline chunks."""
    chunks = [getattr(c, "module", c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(prefix="")}
    return {f"model{i}": c.sharded_state_dict(prefix="") for i, c in enumerate(chunks)}


Extra = Union[None, Dict, Callable[[Dict], Dict]]
"""Additional state: a dict, or a function of the model's sharded state dict (the
optimizer's sharded state is built from it)."""


def _with_extra(chunks: List[torch.nn.Module], extra: Extra) -> Dict:
    state = model_sharded_state_dict(chunks)
    more = extra(state) if callable(extra) else extra
    state.update(more or {})
    return state


def save_checkpoint(root: str, iteration: int, chunks: List[torch.nn.Module],
                    extra: Extra = None, images: Optional[Dict] = None) -> str:
    """Collective: save the model chunks (+ ``extra`` sharded state) atomically with its
    checksums; ``images`` (``IMAGE_KEYS``) is recorded beside the architecture when known."""
    return start_save(root, iteration, chunks, extra, images).finish()


def start_save(root: str, iteration: int, chunks: List[torch.nn.Module],
               extra: Extra = None, images: Optional[Dict] = None) -> PendingChecksums:
    """Collective: :func:`save_checkpoint` up to the visible, marked-latest checkpoint; its
    files are being hashed in the background until the returned handle's ``finish()``
    (collective) writes ``SHA256SUMS``."""
    unknown = set(images or {}) - set(IMAGE_KEYS)
    if unknown:
        raise ValueError(f"unknown image settings {sorted(unknown)}; known: {IMAGE_KEYS}")
    install_checkpoint_writer_queue()
    rank = torch.distributed.get_rank()
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    torch.distributed.barrier()
    dist_checkpointing.save(_with_extra(chunks, extra), tmp)
    fsync_tree(tmp)  # every rank: what this node wrote is on stable storage before the rename
    torch.distributed.barrier()
    if rank == 0:
        cfg = getattr(chunks[0], "module", chunks[0]).config
        _write_atomic(os.path.join(tmp, MODEL_JSON), json.dumps(model_fields(cfg), indent=1))
        if images:
            _write_atomic(os.path.join(tmp, IMAGES_JSON), json.dumps(images, indent=1))
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        _write_atomic(os.path.join(root, LATEST), str(iteration))
    torch.distributed.barrier()
    return PendingChecksums(final)


def load_checkpoint(root: str, chunks: List[torch.nn.Module], iteration: Optional[int] = None,
                    extra: Extra = None, strict: bool = True,
                    verify: bool = True) -> Tuple[int, Dict]:
    """Collective: load the model chunks in place; returns ``(iteration, loaded extra)``.

    ``extra`` holds sharded templates (e.g. the optimizer's) to load alongside the model.
    ``verify`` checks the files against ``SHA256SUMS`` first (all ranks share the reading).
    """
    iteration = _resolve(root, iteration)
    path = iteration_dir(root, iteration)
    if verify:
        verify_checkpoint(path)
    mcore_compat.check_checkpoint_layout(path)
    loaded = dist_checkpointing.load(_with_extra(chunks, extra), path)
    plain = [getattr(c, "module", c) for c in chunks]
    keys = ["model"] if len(plain) == 1 else [f"model{i}" for i in range(len(plain))]
    for chunk, key in zip(plain, keys):
        chunk.load_state_dict(loaded.pop(key), strict=strict)
    return iteration, loaded


def load_common(root: str, iteration: Optional[int] = None) -> Tuple[int, Dict]:
    """``(iteration, common state)``: the non-sharded part (train state, scheduler) of a
    checkpoint, readable without building a model."""
    iteration = _resolve(root, iteration)
    path = iteration_dir(root, iteration)
    mcore_compat.check_checkpoint_layout(path)
    return iteration, dist_checkpointing.load_common_state_dict(path)


def _resolve(root: str, iteration: Optional[int]) -> int:
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"no checkpoint under {root!r} (missing {LATEST})")
    if not os.path.isdir(iteration_dir(root, iteration)):
        raise FileNotFoundError(f"checkpoint {iteration_dir(root, iteration)!r} does not exist")
    return iteration


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
