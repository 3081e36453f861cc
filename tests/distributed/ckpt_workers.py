"""Rank functions of the checkpoint tests."""

import torch
from megatron.core import dist_checkpointing

from eve_megatron.models.eve import eve_config
from eve_megatron.models.eve.sharding import gather_full
from eve_megatron.parallel import ParallelConfig, initialize_parallel
from eve_megatron.training import checkpointing
from eve_megatron.training.model_setup import build_model_chunks


def _model(tp, pp, vp=None, seed=1234):
    initialize_parallel(ParallelConfig(tp, pp, vp), seed=seed)
    cfg = eve_config("tiny", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                     virtual_pipeline_model_parallel_size=vp,
                     share_embeddings_and_output_weights=True)
    return build_model_chunks(cfg)


def _full(chunks):
    out = {}
    for c in chunks:
        out.update(gather_full(c))
    return out


def save_then_reshard(root, layouts):
    """Save at the first layout; load at every other one; return the gathered weights."""
    chunks = _model(*layouts[0])
    checkpointing.save_checkpoint(root, 7, chunks)
    results = {"saved": _full(chunks)}
    for layout in layouts[1:]:
        chunks = _model(*layout, seed=99)  # different random init: loading must overwrite it
        iteration, _ = checkpointing.load_checkpoint(root, chunks)
        results[str(layout)] = (iteration, _full(chunks))
    return results


def crash_during_save(root):
    """Save iteration 1, then die half-way through saving iteration 2."""
    chunks = _model(2, 1)
    checkpointing.save_checkpoint(root, 1, chunks)
    before = _full(chunks)
    for p in chunks[0].parameters():
        p.data.add_(1.0)
    real_save = dist_checkpointing.save

    def broken_save(state, path, *args, **kwargs):
        real_save(state, path, *args, **kwargs)
        raise RuntimeError("killed during save")

    dist_checkpointing.save = broken_save
    try:
        checkpointing.save_checkpoint(root, 2, chunks)
    except RuntimeError:
        pass
    dist_checkpointing.save = real_save
    torch.distributed.barrier()
    latest = checkpointing.latest_iteration(root)
    fresh = _model(2, 1, seed=5)
    iteration, _ = checkpointing.load_checkpoint(root, fresh)
    return {"latest": latest, "iteration": iteration, "before": before, "after": _full(fresh)}


def damaged_load(root):
    """Save at TP2 (both ranks hash a share), damage one file, load on both ranks: return
    each rank's error text."""
    from eve_megatron.checksums import ChecksumError, read_sums

    chunks = _model(2, 1)
    checkpointing.save_checkpoint(root, 1, chunks)
    folder = checkpointing.iteration_dir(root, 1)
    names = sorted(read_sums(folder))
    if torch.distributed.get_rank() == 0:
        with open(f"{folder}/{names[-1]}", "r+b") as f:  # the last file: rank 1's share
            f.seek(10)
            byte = f.read(1)
            f.seek(10)
            f.write(bytes([byte[0] ^ 1]))
    torch.distributed.barrier()
    try:
        checkpointing.load_checkpoint(root, _model(2, 1, seed=3))
    except ChecksumError as exc:
        return {"error": str(exc), "names": names}
    return {"error": None, "names": names}
