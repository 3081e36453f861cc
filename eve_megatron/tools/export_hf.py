"""Export a Megatron distributed checkpoint (any TP/PP, any stage) as a Hugging Face EVE folder.

Example:
    python -m eve_megatron.tools.export_hf --load ckpt/stage3 --save hf/eve-7b \\
        --tokenizer Qwen2.5-7B-Instruct/

An EVEv1 checkpoint (``family: evev1``) becomes the EVE-7B-v1.0 layout (names and config keys
of the release, teacher included, vocabulary cut to the sentencepiece --tokenizer's).

Writes the released layout (sharded safetensors + index, config.json, preprocessor_config.json,
tokenizer files with the release's chat template, the model and processor code for
trust_remote_code, SHA256SUMS) under SAVE.tmp, renames it to SAVE when complete, and prints
a one-line JSON summary. The checkpoint is checked against its SHA256SUMS first. Streams:
memory stays near two of the largest tensors.

Also run as ``eve-export-hf`` (console script of an installed package) or
``python tools/checkpoint/export_hf.py`` (a wrapper kept for source checkouts).
"""

import argparse
import json
import sys

from eve_megatron.hf.export import DTYPES, export_checkpoint
from eve_megatron.outputs import OutputBusyError, error_text


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="checkpoint root (with the latest marker)")
    p.add_argument("--save", required=True, help="HF folder to create")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer folder (or sentencepiece .model)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as stored")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors file")
    p.add_argument("--max-image-size", type=int, default=None,
                   help="image size of preprocessor_config.json (default: what the checkpoint "
                        "recorded from its training data, else 1600)")
    p.add_argument("--alpha", choices=("drop", "white"), default=None,
                   help="alpha rule of the exported image processor (default: the training data's)")
    p.add_argument("--vision-tower", default=None,
                   help="mm_vision_tower for the official EVEv2 code (default: SAVE's absolute path)")
    p.add_argument("--evev1-ratio", type=int, choices=(2, 4), default=2,
                   help="EVEv1 checkpoints: student size / 336 (2: the 672 model, 4: HD 1344)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save")
    p.add_argument("--verify", action="store_true",
                   help="read the finished export back: its SHA256SUMS and every tensor bit for "
                        "bit against the checkpoint (the checkpoint itself is always verified)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the tool on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    a = parse_args(argv)
    if a.max_shard_size <= 0:
        print(f"export_hf: error: --max-shard-size must be positive (GiB), got {a.max_shard_size}",
              file=sys.stderr)
        return 2
    try:
        summary = export_checkpoint(a.load, a.save, a.tokenizer, a.iteration, a.dtype,
                                    int(a.max_shard_size * 2**30), a.max_image_size,
                                    a.overwrite, progress=not a.no_progress, alpha=a.alpha,
                                    vision_tower=a.vision_tower, verify=a.verify,
                                    evev1_ratio=a.evev1_ratio)
    except (KeyError, ValueError, FileNotFoundError, FileExistsError, OutputBusyError) as exc:
        print(f"export_hf: error: {error_text(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
