#!/usr/bin/env python
"""Peak memory of the streaming HF export on a multi-GB random checkpoint.

Builds an EVEv2.0 model at the 7B widths (hidden 3584, ffn 18944, 28 heads / 4 groups,
vocab 152064, untied) with few layers, saves it in bf16 through ``save_checkpoint`` at
TP=1 (one stored chunk per tensor: the worst case for the reader), then runs
``tools/checkpoint/export_hf.py`` in a fresh process that reports its own peak RSS
(``ru_maxrss``) and its RSS after imports. Prints one JSON line; nothing is asserted.

    python tools/bench/bench_export.py --layers 2 --workdir /tmp/bench_export
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

WIDTHS = dict(hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
              num_query_groups=4, vocab_size=152064, vision_hidden_size=1024,
              share_embeddings_and_output_weights=False, decoupling="all")

_CHILD = """
import json, resource, sys, time
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096
sys.path.insert(0, {root!r})
from eve_megatron.hf.export import export_checkpoint
base = rss()
t = time.time()
summary = export_checkpoint({load!r}, {save!r}, progress=False)
summary.update(rss_after_imports=base, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               export_seconds=round(time.time() - t, 1))
print(json.dumps(summary))
"""


def build_checkpoint(root: str, layers: int) -> None:
    """Rank function (world of one): a random bf16 model saved with ``save_checkpoint``."""
    import torch

    from eve_megatron.models.eve import EVEModel, eve_config
    from eve_megatron.parallel import ParallelConfig, initialize_parallel
    from eve_megatron.training.checkpointing import save_checkpoint

    initialize_parallel(ParallelConfig())
    cfg = eve_config("qwen2.5-7b", num_layers=layers, params_dtype=torch.bfloat16, bf16=True,
                     **WIDTHS)
    model = EVEModel(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # random everywhere (norms too), never constant
            p.uniform_(-0.05, 0.05)
    save_checkpoint(root, 1, [model])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/bench_export")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the export")
    a = p.parse_args()
    from eve_megatron.launch import run_distributed

    shutil.rmtree(a.workdir, ignore_errors=True)
    ckpt, out = os.path.join(a.workdir, "megatron"), os.path.join(a.workdir, "hf")
    t = time.time()
    run_distributed("bench_export:build_checkpoint", 1, timeout=3600, root=ckpt, layers=a.layers)
    build_seconds = round(time.time() - t, 1)
    child = _CHILD.format(root=ROOT, load=ckpt, save=out)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 1
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt) for f in fs)
    s.update(layers=a.layers, checkpoint_bytes=disk, build_seconds=build_seconds,
             peak_over_largest=round(s["peak_rss"] / s["largest_tensor_bytes"], 2),
             peak_minus_imports_over_largest=round(
                 (s["peak_rss"] - s["rss_after_imports"]) / s["largest_tensor_bytes"], 2))
    print(json.dumps(s))
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
