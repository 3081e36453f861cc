"""A checkpoint folder has one owner: a second live trainer, a fresh run into another run's
folder, the copy tool into a training folder, and a mistyped --load are refused before any
work (exit 2, the folder untouched); resuming (--load = --save) and --overwrite are allowed."""

import os
import subprocess
import sys

import pytest

from eve_megatron.outputs import OutputLock
from eve_megatron.training import checkpointing
from tests.training_data import write_train_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_train_dataset(str(tmp_path_factory.mktemp("guards") / "train"), n=24, seed=2)


def _train(data, *flags):
    cmd = [sys.executable, "-m", "eve_megatron.pretrain", "--model-preset", "tiny",
           "--data-path", data, "--seq-length", "64", "--micro-batch-size", "2",
           "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-3", "--num-workers", "0",
           "--log-interval", "1", "--no-progress", "--stage", "0", *map(str, flags)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_checkpoint_folders_have_one_owner(data, tmp_path):
    run_a = str(tmp_path / "run_a")
    with OutputLock(run_a, "checkpoint root --save"):  # a trainer that is still running
        busy = _train(data, "--save", run_a)
    assert busy.returncode == 2 and "is being written by pid" in busy.stderr
    assert not os.path.exists(run_a)
    first = _train(data, "--save", run_a)
    assert first.returncode == 0, first.stderr[-2000:]
    assert checkpointing.latest_iteration(run_a) == 2
    fresh = _train(data, "--save", run_a, "--train-iters", 1)  # another run, same folder
    assert fresh.returncode == 2 and "already holds another run's checkpoints" in fresh.stderr
    assert checkpointing.latest_iteration(run_a) == 2  # latest did not move back
    resume = _train(data, "--load", run_a, "--save", run_a, "--train-iters", 3)
    assert resume.returncode == 0 and checkpointing.latest_iteration(run_a) == 3
    typo = _train(data, "--load", str(tmp_path / "run_A"), "--save", str(tmp_path / "run_b"))
    assert typo.returncode == 2 and "holds no checkpoint" in typo.stderr
    assert not os.path.exists(tmp_path / "run_b")
    (tmp_path / "file").write_text("x")
    assert "is a file" in _train(data, "--save", str(tmp_path / "file")).stderr
    copy = [sys.executable, "tools/checkpoint/copy_vision_branch.py", "--load", run_a,
            "--save", run_a + "_copy"]
    for extra, code in (([], 0), ([], 2), (["--overwrite"], 0)):
        out = subprocess.run(copy + extra, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == code, out.stderr[-2000:]
        if code == 2:
            assert "already holds checkpoints" in out.stderr
    over = _train(data, "--save", run_a + "_copy", "--overwrite")
    assert over.returncode == 0, over.stderr[-2000:]
