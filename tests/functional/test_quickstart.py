"""examples/quickstart.sh end to end on a shrunken setting (the pipeline, not the accuracy:
the full run and its figures are in docs/benchmarks.md)."""

import os
import re
import subprocess

import pytest

from eve_megatron.training import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_quickstart_script_runs_every_step(tmp_path):
    env = dict(os.environ, QUICKSTART_DIR=str(tmp_path / "qs"),
               QUICKSTART_DATA_ARGS="--train-images 64 --heldout-images 4",
               QUICKSTART_TRAIN_ARGS="--train-iters 2 --log-interval 1",
               QUICKSTART_EVAL_ARGS="--shuffled-images-control")
    out = subprocess.run(["bash", "examples/quickstart.sh"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    for step in range(1, 8):
        assert f"{step}/7" in out.stdout
    ckpt = tmp_path / "qs" / "ckpt"
    assert checkpointing.read_model_fields(str(ckpt / "stage0"))["decoupling"] == "none"
    assert checkpointing.read_model_fields(str(ckpt / "stage0_copied"))["decoupling"] == "all"
    assert checkpointing.latest_iteration(str(ckpt / "stage2")) == 2
    assert "trainable=patch_embedding" in out.stdout and "trainable=vision" in out.stdout
    acc = re.findall(r"^heldout_accuracy=([0-9.]+)$", out.stdout, re.M)
    assert len(acc) == 1 and 0.0 <= float(acc[0]) <= 1.0
    assert re.search(r"^control_accuracy_shuffled_images=[0-9.]+$", out.stdout, re.M)
