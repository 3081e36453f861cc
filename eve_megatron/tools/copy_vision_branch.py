"""EVEv2 copy step: turn a stage-0 checkpoint (decoupling none) into one with every vision
weight an exact copy of its text twin (decoupling all), ready for stage 1.

    python -m eve_megatron.tools.copy_vision_branch --load ckpt/stage0 --save ckpt/stage0_copied

Works on the sharded checkpoint of any TP/PP layout. One process (the default) holds the
whole model; for big models run it under torchrun with a model-parallel layout, e.g.
``torchrun --nproc-per-node 4 -m eve_megatron.tools.copy_vision_branch --load A --save B
--tensor-model-parallel-size 4``. The output is a model-only checkpoint: stage 1 starts
from it with a fresh optimizer. Prints a one-line JSON summary.

Also run as ``eve-copy-vision-branch`` (console script of an installed package) or
``python tools/checkpoint/copy_vision_branch.py`` (a wrapper kept for source checkouts).
"""

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    """Run the tool on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="source checkpoint folder (decoupling none/mlp)")
    p.add_argument("--save", required=True, help="output checkpoint folder")
    p.add_argument("--ckpt-step", type=int, default=None, help="source iteration (default: latest)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--overwrite", action="store_true",
                   help="write into a --save that already holds checkpoints")
    a = p.parse_args(argv)
    if os.path.abspath(a.load) == os.path.abspath(a.save):
        print("copy_vision_branch: error: --save must differ from --load", file=sys.stderr)
        return 2

    import torch

    from eve_megatron.outputs import OutputBusyError
    from eve_megatron.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from eve_megatron.training.copy_vision import copy_vision_branch

    try:
        initialize_parallel(ParallelConfig(a.tensor_model_parallel_size,
                                           a.pipeline_model_parallel_size))
        summary = copy_vision_branch(a.load, a.save, a.ckpt_step, a.overwrite)
    except (ValueError, FileNotFoundError, OutputBusyError) as exc:
        print(f"copy_vision_branch: error: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
    if int(os.environ.get("RANK", "0")) == 0:
        summary["copied_keys"] = len(summary["copied_keys"])
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
