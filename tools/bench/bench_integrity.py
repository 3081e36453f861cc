#!/usr/bin/env python
"""What integrity checks cost: checkpoint checksums on the save and load path, per-sample
checksums in the loader.

Save/load (the trainer's own path, one rank): a routed EVE trainer with its distributed
optimizer runs a step, saves (``Trainer.save``: dist save + flush + rename, the critical
path), runs the next step while its files are hashed in the background, then
``finish_save`` (the only wait the checksums add). Then the checkpoint is verified and
loaded as a resume does. Loader: rows/s through ``EVEPackedDataset`` (read, verify,
decode, blocks; in-process, one thread) with per-sample verification on and off, in
ABAB order, for 1600^2 JPEG caption samples and for text-only samples (the worst case:
nothing to decode). Prints one JSON line; nothing is asserted.

    python tools/bench/bench_integrity.py --hidden 1024 --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)


def _flags(a, data: str, save: str):
    from bench_train_step import _flags as step_flags

    ns = argparse.Namespace(preset="tiny", hidden=a.hidden, ffn=a.hidden * 11 // 4, heads=8,
                            layers=a.layers, vocab=None, seq=a.seq, micro_batch=1,
                            global_batch=2, bf16=False, fp8_format=None, transformer_impl="local")
    return step_flags(ns, data, "all", "sdpa") + ["--save", save]


def checkpoint_costs(args: dict, data: str, save: str) -> dict:
    """Rank function: step, save, overlapped step, finish, verify, load (seconds)."""
    import torch

    from eve_megatron.parallel import initialize_parallel
    from eve_megatron.pretrain import build_trainer
    from eve_megatron.training import checkpointing
    from eve_megatron.training.arguments import parse_config
    from eve_megatron.training.checkpoint_checksums import verify_checkpoint
    from eve_megatron.training.data_setup import StepData
    from eve_megatron.training.state import loading_extra

    a = argparse.Namespace(**args)
    cfg = parse_config(_flags(a, data, save))
    cfg.validate(1)
    initialize_parallel(cfg.parallel, seed=1234)
    trainer = build_trainer(cfg)
    micro = [next(trainer.stream) for _ in range(2)]

    def step():
        t = time.perf_counter()
        trainer.train_step(StepData(iter(micro), 2, 1))
        return time.perf_counter() - t

    out = {"step_s": [], "save_s": [], "hash_s": [], "overlapped_step_s": [], "finish_wait_s": [],
           "verify_s": [], "load_s": []}
    step()
    for r in range(a.rounds):
        out["step_s"].append(step())
        trainer.state.iteration = r + 1
        t = time.perf_counter()
        trainer.save()
        out["save_s"].append(time.perf_counter() - t)
        pending = trainer.pending_save
        out["overlapped_step_s"].append(step())
        t = time.perf_counter()
        trainer.finish_save()
        out["finish_wait_s"].append(time.perf_counter() - t)
        out["hash_s"].append(pending.seconds)
        folder = checkpointing.iteration_dir(save, r + 1)
        t = time.perf_counter()
        assert verify_checkpoint(folder)
        out["verify_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        checkpointing.load_checkpoint(save, trainer.chunks, r + 1, verify=False,
                                      extra=loading_extra(trainer.optimizer, True, True))
        out["load_s"].append(time.perf_counter() - t)
    out["checkpoint_bytes"] = sum(os.path.getsize(os.path.join(d, f))
                                  for d, _, fs in os.walk(folder) for f in fs)
    del torch
    return out


def loader_costs(prefix: str, seq: int, rows: int, rounds: int) -> dict:
    """Rows/s with verification on and off (ABAB), in-process."""
    from eve_megatron.data.dataset import EVEPackedDataset, PackedDataConfig

    ds = EVEPackedDataset(PackedDataConfig([prefix], seq, rows))
    for g in range(rows):  # warm-up: page cache, allocator
        ds[g]
    times = {True: [], False: []}
    for r in range(2 * rounds):
        verify = (r % 4) in (0, 3)
        for d in ds.datasets:
            d.verify = verify
        t = time.perf_counter()
        for g in range(rows):
            ds[g]
        times[verify].append(time.perf_counter() - t)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"rows_per_s_verified": round(rows / on, 2), "rows_per_s_unverified": round(rows / off, 2),
            "verified_over_unverified_time": round(on / off, 4)}


def _text_only(prefix: str, n: int, seq: int) -> str:
    import numpy as np

    from eve_megatron.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    w = IndexedDatasetWriter(prefix, {"bench": True})
    for _ in range(n):
        t = int(rng.integers(seq // 8, seq // 2))
        w.add(rng.integers(1, 150000, t), np.ones(t))
    w.finalize()
    return prefix


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=512, help="training rows (save benchmark)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loader-seq", type=int, default=8192)
    p.add_argument("--loader-rows", type=int, default=12)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    from bench_loader import build
    from bench_train_step import write_dataset

    from eve_megatron.launch import run_distributed

    with tempfile.TemporaryDirectory(prefix="bench_integrity_") as tmp:
        data = write_dataset(os.path.join(tmp, "data"), a.seq)
        ckpt = run_distributed("bench_integrity:checkpoint_costs", 1, timeout=3600,
                               args=vars(a), data=data, save=os.path.join(tmp, "ckpt"))[0]
        build(os.path.join(tmp, "photos"), 32, 1600, "jpeg")
        loader = {"jpeg_1600": loader_costs(os.path.join(tmp, "photos"), a.loader_seq,
                                            a.loader_rows, a.rounds),
                  "text_only": loader_costs(_text_only(os.path.join(tmp, "text"), 4000,
                                                       a.loader_seq), a.loader_seq,
                                            a.loader_rows * 20, a.rounds)}
    med = {k: statistics.median(v) for k, v in ckpt.items() if isinstance(v, list)}
    summary = {
        "config": vars(a), "checkpoint_bytes": ckpt["checkpoint_bytes"],
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "hash_GB_per_s": round(ckpt["checkpoint_bytes"] / med["hash_s"] / 1e9, 2),
        "finish_wait_over_save": round(med["finish_wait_s"] / med["save_s"], 4),
        "hash_over_save": round(med["hash_s"] / med["save_s"], 4),
        "overlapped_step_over_step": round(med["overlapped_step_s"] / med["step_s"], 4),
        "verify_over_load": round(med["verify_s"] / med["load_s"], 4),
        "loader": loader}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
