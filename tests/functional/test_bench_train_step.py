"""The training-step benchmark runs the trainer's step for all three models and reports both
ratios per attention backend (no speed is asserted: figures live in docs/benchmarks.md)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_train_step_reports_both_ratios():
    proc = subprocess.run(
        [sys.executable, "tools/bench/bench_train_step.py", "--rounds", "1", "--seq", "128",
         "--hidden", "64", "--ffn", "128", "--heads", "4", "--global-batch", "2",
         "--attention", "sdpa", "flex"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for backend in ("sdpa", "flex"):
        r = summary["results"][backend]
        assert r["attention"] == backend
        assert set(r["median_s"]) == {"routed", "dense", "gpt"} and min(r["median_s"].values()) > 0
        assert r["routed_over_dense"] > 0 and r["dense_over_gpt"] > 0
