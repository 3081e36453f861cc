"""The golden loss curve: the first 20 iterations of a fixed tiny fp32 run, stored in
``tests/functional/golden/loss_curve_tiny.json`` with everything that produced it.

    python -m tests.functional.golden_curve            # rerun, print the worst deviation
    python -m tests.functional.golden_curve --write    # rerun and record the curve

The file holds the run (data, trainer flags) and one curve per (torch, Megatron-Core)
release pair it was recorded with; ``--write`` replaces the installed pair's curve (and
drops the others when the run itself changed). Record only for an intended change of
numerics, or for a release pair whose kernels round differently: the file's diff then
shows the change in review. ``tests/functional/test_golden_curve.py`` reruns the run and
compares with the installed pair's curve (the first recorded one when there is none).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from typing import Dict, List, Tuple

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "loss_curve_tiny.json")
COMMAND = "python -m tests.functional.golden_curve --write"
DATA = {"writer": "tests.training_data.write_learnable_dataset", "n": 96, "seed": 11}
"""The training data: counting runs with images (deterministic in ``seed``)."""
ARGS = ["--model-preset", "tiny", "--seq-length", "64", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "20", "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-warmup-iters", "2", "--weight-decay", "0.01", "--clip-grad", "1.0",
        "--num-workers", "0", "--log-interval", "5", "--no-progress", "--seed", "7"]
"""``eve_megatron.pretrain`` flags of the run (fp32, one rank, one thread), plus
``--data-path`` of the data above."""
RTOL = 5e-7
"""Relative tolerance per iteration. On one machine the run repeats bit for bit (one
thread). Rounding alone moves it by ~5e-8 (measured: two threads instead of one 5.2e-8,
FlexAttention instead of SDPA 5.6e-8), so 5e-7 leaves 10x for other CPUs, while real
changes move it by more (measured: weight decay 1% off 1.9e-6, clip-grad 1% off 1.0e-6,
Adam eps 1e-8 -> 1e-7 5.9e-4).

One curve serves both supported Megatron-Core releases: under the same torch, 0.16.1 and
0.19.2 give this run bit for bit (measured in the Python 3.12 environment, 0.16.1's cp312
wheel put on the path). The 3.12 environment's torch (the package index's CUDA build of
2.13.0, run on CPU) differs from 3.11's CPU build by one float32 rounding step in the
reported loss of iterations 7, 11, 18 and 20 (5.2e-8; the weights stay equal: the next
iteration is bit for bit again), well within the tolerance."""


def curve_run(data: str, args: List[str]) -> List[float]:
    """Rank function: the trainer's losses of the run (one intra-op thread: deterministic)."""
    import torch

    from eve_megatron.pretrain import pretrain

    torch.set_num_threads(1)
    return pretrain([*args, "--data-path", data]).losses


def run_curve(args: List[str] = ARGS, data: Dict = DATA) -> List[float]:
    """Write the data into a temporary folder and run the trainer on one rank."""
    from eve_megatron.launch import run_distributed
    from tests import training_data

    assert data["writer"].startswith("tests.training_data.")
    writer = getattr(training_data, data["writer"].rsplit(".", 1)[1])
    kwargs = {k: v for k, v in data.items() if k != "writer"}
    with tempfile.TemporaryDirectory(prefix="eve_golden_") as tmp:
        prefix = writer(os.path.join(tmp, "data"), **kwargs)
        return run_distributed("tests.functional.golden_curve:curve_run", 1, data=prefix,
                               args=list(args))[0]


def version_key() -> Dict[str, str]:
    """The releases the numerics depend on (torch without its local build tag)."""
    import torch

    return {"torch": torch.__version__.split("+")[0],
            "megatron-core": metadata.version("megatron-core")}


def load_golden(path: str = GOLDEN) -> Dict:
    """The stored run and its curves."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def golden_losses(golden: Dict) -> Tuple[List[float], Dict, bool]:
    """``(losses, their releases, recorded with the installed releases)``: the installed
    pair's curve, else the first one."""
    key = version_key()
    for curve in golden["curves"]:
        if all(curve[k] == v for k, v in key.items()):
            return curve["losses"], curve, True
    return golden["curves"][0]["losses"], golden["curves"][0], False


def write_golden(losses: List[float], path: str = GOLDEN) -> None:
    """Record ``losses`` as the installed releases' curve of the run."""
    run = {"command": COMMAND, "data": DATA, "args": ARGS, "world_size": 1}
    old = load_golden(path) if os.path.exists(path) else {}
    same_run = all(old.get(k) == v for k, v in run.items())
    key = version_key()
    curves = [c for c in old.get("curves", []) if same_run and any(c[k] != v for k, v in key.items())]
    recorded = {"python": platform.python_version(), "numpy": metadata.version("numpy"),
                "machine": platform.machine()}
    curves.append({**key, "recorded_with": recorded, "losses": losses})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**run, "curves": curves}, f, indent=1)
        f.write("\n")


def deviations(losses: List[float], golden: List[float]) -> List[float]:
    """Relative deviation of each iteration's loss from the golden one."""
    return [abs(a - b) / abs(b) for a, b in zip(losses, golden)]


def main(argv=None) -> int:
    """Rerun the golden run; with ``--write`` record its curve."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true", help=f"record the curve in {GOLDEN}")
    a = p.parse_args(argv)
    losses = run_curve()
    if a.write:
        write_golden(losses)
        print(f"wrote {GOLDEN}: {version_key()}, {losses[0]:.6f} -> {losses[-1]:.6f}")
        return 0
    golden, releases, _ = golden_losses(load_golden())
    print(json.dumps({"losses": losses, "compared_with": releases,
                      "max_relative_deviation": max(deviations(losses, golden))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
