"""The real command line under torchrun: two "nodes" on this machine meeting through the
c10d rendezvous (the multi-node path), TensorBoard output, then a CLI resume."""

import glob
import os
import subprocess
import sys

import pytest

from eve_megatron.parallel import free_port
from eve_megatron.training import checkpointing
from tests.training_data import write_train_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_args(data, save, iters, *extra):
    return ["-m", "eve_megatron.pretrain", "--model-preset", "tiny", "--data-path", data,
            "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "2",
            "--train-iters", str(iters), "--lr", "1e-3", "--lr-warmup-iters", "1",
            "--num-workers", "0", "--log-interval", "1", "--save", save, "--save-interval", "2",
            *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def test_two_nodes_rendezvous_then_resume(tmp_path):
    data = write_train_dataset(str(tmp_path / "train"), n=48, seed=5)
    save, tb = str(tmp_path / "ckpt"), str(tmp_path / "tb")
    port = free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "eve-test", "--local-addr", "127.0.0.1",
            *_train_args(data, save, 2, "--tensor-model-parallel-size", "2",
                         "--tensorboard-dir", tb)]
    procs = [subprocess.Popen(node, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    text = "\n".join(outs)
    assert "layout {'tp': 2, 'pp': 1, 'dp': 1, 'vp': 1}" in text
    assert "iteration        2/2 | lr" in text and "done: iteration 2" in text
    assert checkpointing.latest_iteration(save) == 2
    assert glob.glob(os.path.join(tb, "events.out.tfevents.*"))
    # resume on one node with a different layout (DP2 instead of TP2), through the CLI
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", *_train_args(data, save, 4, "--load", save)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "resumed" in out.stdout and "starting at iteration 2" in out.stdout
    assert "fresh RNG states (different layout)" in out.stdout
    assert checkpointing.latest_iteration(save) == 4


@pytest.mark.parametrize("argv, message", [
    (["--model-preset", "tiny", "--train-iters", "1"], "--data-path is required"),
    (["--tensor-parallel", "2"], "unrecognized arguments: --tensor-parallel"),
])
def test_cli_configuration_error_exit_code(tmp_path, argv, message):
    out = subprocess.run([sys.executable, "-m", "eve_megatron.pretrain", *argv], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=200)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


def test_torchrun_shows_our_reason_and_workers_die_with_their_launcher(tmp_path):
    """A configuration error reaches torchrun's failure summary (elastic error file) with our
    status line; SIGKILL of the launcher alone kills its workers (no orphan keeps saving)."""
    import signal
    import time

    import psutil

    data = write_train_dataset(str(tmp_path / "train"), n=48, seed=6)
    (tmp_path / "file").write_text("not a folder")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    bad = subprocess.run([*launcher, *_train_args(data, str(tmp_path / "file"), 2)], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=400)
    text = bad.stdout + bad.stderr
    assert bad.returncode == 1 and "ConfigError: checkpoint: --save" in text, text[-3000:]
    assert "exit 2 (configuration error)" in text
    save = str(tmp_path / "ckpt")
    run = subprocess.Popen([*launcher, *_train_args(data, save, 400)], cwd=ROOT, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while checkpointing.latest_iteration(save) is None and time.time() < deadline:
            time.sleep(0.5)
        assert checkpointing.latest_iteration(save) is not None, "the run never saved"
        def is_worker(p):
            try:
                return "eve_megatron.pretrain" in " ".join(p.cmdline())
            except psutil.Error:  # a helper that already exited (zombie) or went away
                return False
        family = psutil.Process(run.pid).children(recursive=True)  # workers and their helpers
        assert len([p for p in psutil.Process(run.pid).children() if is_worker(p)]) == 2
        run.send_signal(signal.SIGKILL)
        run.wait()
        gone, alive = psutil.wait_procs(family, timeout=20)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"outlived their launcher: {[(p.pid, p.cmdline()[-2:]) for p in alive]}"

        def of_this_run():  # forked helpers keep the worker's command line (and its --save)
            found = []
            for p in psutil.process_iter(["cmdline", "status"]):
                if save in " ".join(p.info["cmdline"] or []) and p.info["status"] != "zombie":
                    found.append(p.pid)
            return found
        deadline = time.time() + 20
        while of_this_run() and time.time() < deadline:
            time.sleep(0.2)
        assert not of_this_run(), "processes of the killed run are still alive"
        latest = checkpointing.latest_iteration(save)
        time.sleep(3)
        assert checkpointing.latest_iteration(save) == latest  # nobody saves any more
    finally:
        if run.poll() is None:
            run.kill()
