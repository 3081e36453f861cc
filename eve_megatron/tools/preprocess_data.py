"""Preprocess LLaVA JSON/JSONL, caption JSONL, WebDataset tars and text into an indexed dataset.

Example:
    python -m eve_megatron.tools.preprocess_data --input data.json shard-0000.tar \\
        --image-root images/ --tokenizer qwen2_tokenizer/ --template qwen2 \\
        --max-image-size 1600 --seq-length 4096 --output-prefix out/stage2 --workers 8

EVEv1 (EVE-7B-v1.0; 28-pixel blocks, each image stored with its CLIP teacher image):
    python -m eve_megatron.tools.preprocess_data --model-family evev1 --evev1-ratio 2 \\
        --template vicuna_v1 --tokenizer vicuna-7b-v1.5/tokenizer.model --input llava.json \\
        --image-root images/ --seq-length 2048 --output-prefix out/evev1_sft

Prints a one-line JSON summary on stdout; exits 1 when the bad-sample fraction exceeds
--max-bad-fraction (no dataset is then written under the final name).

Also run as ``eve-preprocess`` (console script of an installed package) or
``python tools/preprocess/preprocess_data.py`` (a wrapper kept for source checkouts).
"""

import argparse
import json
import os
import sys

from eve_megatron.data.images import ALPHA_RULES, ImageConfig
from eve_megatron.data.preprocess import PreprocessConfig, run_preprocess
from eve_megatron.data.templates import FAMILIES, TEMPLATES
from eve_megatron.hf.evev1_image_rules import RATIOS
from eve_megatron.outputs import OutputBusyError


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help=".json, .jsonl or .tar inputs")
    p.add_argument("--image-root", default=".", help="folder for relative image paths")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer folder or sentencepiece .model")
    p.add_argument("--template", choices=TEMPLATES, default=None,
                   help="prompt template (default: plain for evev2, plain_bos for evev1)")
    p.add_argument("--model-family", choices=FAMILIES, default="evev2",
                   help="evev2: AnyRatio images, 32-px blocks; evev1: EVEv1's resize rule, "
                        "28-px blocks, plus each image's 336-px CLIP teacher image")
    p.add_argument("--evev1-ratio", type=int, choices=RATIOS, default=2,
                   help="EVEv1 student size / base size: 2 (672, EVE-7B-v1.0) or 4 (1344, HD)")
    p.add_argument("--max-image-size", type=int, default=1600,
                   help="AnyRatio max side (800, 1600...); EVEv2 only")
    p.add_argument("--seq-length", type=int, required=True, help="longest allowed sample in tokens")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.skipped.jsonl")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--truncate", action="store_true", help="truncate too-long text instead of skipping")
    p.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="fail when skipped/seen exceeds this (default 0.05)")
    p.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg",
                   help="stored encoding of resized images (png is lossless)")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--max-image-pixels", type=int, default=89_478_485,
                   help="refuse images declaring more pixels (decompression bombs)")
    p.add_argument("--alpha", choices=ALPHA_RULES, default="drop",
                   help="transparent images: drop the alpha channel (the reference's rule) "
                        "or composite onto white")
    p.add_argument("--system-prompt", default=None, help="override the template's system prompt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset that already exists under --output-prefix")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the tool on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    a = parse_args(argv)
    try:
        image = ImageConfig(max_size=a.max_image_size, max_pixels=a.max_image_pixels,
                            encode_format=a.image_format, jpeg_quality=a.jpeg_quality,
                            alpha=a.alpha)
        cfg = PreprocessConfig(
            inputs=a.input, output_prefix=a.output_prefix, tokenizer=a.tokenizer,
            template=a.template or ("plain_bos" if a.model_family == "evev1" else "plain"),
            model_family=a.model_family, evev1_ratio=a.evev1_ratio, image_root=a.image_root,
            seq_length=a.seq_length, image=image,
            workers=a.workers, truncate=a.truncate, max_bad_fraction=a.max_bad_fraction,
            system_prompt=a.system_prompt, progress=not a.no_progress, overwrite=a.overwrite)
        summary = run_preprocess(cfg)
    except (ValueError, FileNotFoundError, OutputBusyError) as exc:
        print(f"preprocess_data: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    if summary["failed"]:
        print(f"preprocess_data: failed: bad fraction {summary['bad_fraction']} > "
              f"--max-bad-fraction {cfg.max_bad_fraction} (or nothing written); see "
              f"{summary['report']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
