"""Import a Hugging Face Qwen2/Qwen2.5, EVE, EVEv1 or Llama folder as a Megatron checkpoint.

Example:
    python -m eve_megatron.tools.import_hf --hf Qwen2.5-7B-Instruct/ --save ckpt/qwen7b \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --decoupling none

Runs TP x PP local ranks (gloo on CPU, NCCL on GPU). A Qwen2 source gets a fresh patch
embedding; ``--decoupling mlp|all`` makes vision copies of the text weights the source
lacks. An EVEv1 folder (model_type "eve", EVELlamaForCausalLM: the EVE-7B-v1.0 layout) or a
plain Llama/Vicuna one (with --teacher CLIP_DIR, an HF CLIPVisionModel folder; fresh patch
embedding layer and PAL) becomes an EVEv1 checkpoint (family evev1).
Writes SAVE/iter_0000000 (model only) atomically and prints a one-line JSON summary.

Also run as ``eve-import-hf`` (console script of an installed package) or
``python tools/checkpoint/import_hf.py`` (a wrapper kept for source checkouts).
"""

import argparse
import json
import sys

from eve_megatron.hf.importer import DTYPES, import_hf
from eve_megatron.outputs import OutputBusyError, error_text


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf", required=True, help="HF model folder (config.json + weights)")
    p.add_argument("--save", required=True, help="checkpoint root to create")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--decoupling", choices=("none", "mlp", "all"), default=None,
                   help="vision copies: default none for Qwen2, the source's for EVE")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the source's")
    p.add_argument("--vision-hidden-size", type=int, default=1024,
                   help="patch embedding width for a Qwen2 source (EVE: from its config)")
    p.add_argument("--teacher", default=None,
                   help="EVEv1: an HF CLIP vision model folder for the frozen teacher (needed for "
                        "a plain Llama/Vicuna source; replaces an EVEv1 folder's own)")
    p.add_argument("--seed", type=int, default=1234, help="seed of a fresh patch embedding")
    p.add_argument("--iteration", type=int, default=0, help="iteration number to save as")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the tool on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    a = parse_args(argv)
    try:
        summary = import_hf(a.hf, a.save, a.tensor_model_parallel_size,
                            a.pipeline_model_parallel_size, a.decoupling, a.dtype,
                            a.vision_hidden_size, a.seed, a.iteration, a.overwrite,
                            progress=not a.no_progress, teacher=a.teacher)
    except (KeyError, ValueError, FileNotFoundError, FileExistsError, OutputBusyError) as exc:
        print(f"import_hf: error: {error_text(exc)}", file=sys.stderr)
        return 2
    if summary["unused_hf_tensors"]:
        print(f"import_hf: note: {len(summary['unused_hf_tensors'])} HF tensors not used: "
              f"{summary['unused_hf_tensors'][:8]}", file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
