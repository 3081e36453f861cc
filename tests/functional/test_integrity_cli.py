"""Integrity through the command lines: the trainer records SHA256SUMS for every checkpoint
(hashed in the background) and refuses a damaged one; the copy tool, the exporter and
generate.py name the damaged file; a damaged dataset sample stops the run naming file and
index, or is skipped and counted with --corrupt-samples skip."""

import json
import os
import subprocess
import sys

import numpy as np

from eve_megatron.checksums import SUMS, check_folder, read_sums
from eve_megatron.data.indexed import IndexedDataset
from eve_megatron.training import checkpointing
from tests.functional.test_output_guards import ROOT, _train
from tests.training_data import write_train_dataset


def _flip(path, offset, n=8):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _tool(*cmd):
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_checkpoints_carry_sums_and_damage_is_refused_everywhere(tmp_path):
    data = write_train_dataset(str(tmp_path / "train"), n=24, seed=2)
    run = str(tmp_path / "run")
    first = _train(data, "--save", run, "--save-interval", 1)
    assert first.returncode == 0, first.stderr[-2000:]
    for it in (1, 2):  # iteration 1 finished during step 2, iteration 2 at the end
        assert check_folder(checkpointing.iteration_dir(run, it), required=True)
    folder = checkpointing.iteration_dir(run, 2)
    shard = max(read_sums(folder), key=lambda n: os.path.getsize(os.path.join(folder, n)))
    _flip(os.path.join(folder, shard), os.path.getsize(os.path.join(folder, shard)) // 3)

    resume = _train(data, "--load", run, "--save", run, "--train-iters", 3)
    assert resume.returncode == 2 and f"{shard}: damaged" in resume.stderr, resume.stderr[-2000:]
    assert checkpointing.latest_iteration(run) == 2
    copy = _tool("tools/checkpoint/copy_vision_branch.py", "--load", run, "--save", run + "_c")
    assert copy.returncode == 2 and f"{shard}: damaged" in copy.stderr, copy.stderr[-2000:]
    export = _tool("tools/checkpoint/export_hf.py", "--load", run, "--save", run + "_hf",
                   "--no-progress")
    assert export.returncode == 2 and f"{shard}: damaged" in export.stderr
    assert not os.path.exists(run + "_hf")

    _flip(os.path.join(folder, shard), os.path.getsize(os.path.join(folder, shard)) // 3)
    export = _tool("tools/checkpoint/export_hf.py", "--load", run, "--save", run + "_hf",
                   "--no-progress", "--verify")
    assert export.returncode == 0, export.stderr[-2000:]
    summary = json.loads(export.stdout.strip().splitlines()[-1])
    assert summary["verified"] and summary["source_verified"]
    weights = os.path.join(run + "_hf", "model.safetensors")
    with open(weights, "r+b") as f:  # 200 KB of random bytes inside the tensor data
        f.seek(os.path.getsize(weights) // 2)
        f.write(np.random.default_rng(0).bytes(200_000))
    answer = _tool("tools/generate.py", "--model", run + "_hf", "--prompt", "hi")
    assert answer.returncode == 2 and "model.safetensors: damaged" in answer.stderr
    assert SUMS in answer.stderr


def test_a_damaged_sample_stops_the_run_or_is_skipped_and_counted(tmp_path):
    data = write_train_dataset(str(tmp_path / "train"), n=24, seed=2)
    ds = IndexedDataset(data)
    for i in range(0, len(ds), 2):  # every other sample's first token
        _flip(data + ".bin", int(ds.field("record_offset")[i]), 1)
    stop = _train(data, "--num-workers", 1)
    last = stop.stderr.strip().splitlines()[-1]
    assert stop.returncode == 1, stop.stderr[-2000:]
    assert "exit 1 (stopped)" in last and "train.bin: sample" in last and "is damaged" in last
    assert "--corrupt-samples skip" in last
    skip = _train(data, "--corrupt-samples", "skip", "--train-iters", 1)
    assert skip.returncode == 0, skip.stderr[-2000:]
    assert "damaged samples skipped" in skip.stdout
