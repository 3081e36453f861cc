"""Answer a prompt (optionally about an image) with an exported EVE folder; greedy, fp32, CPU.

Example:
    python -m eve_megatron.tools.generate --model hf/eve-7b --image cat.jpg \\
        --prompt "What is in the image?"

The image is prepared by the export's own image processor (its max_size and alpha rule;
the reference's inference resize unless --resize train), the prompt uses the release's qwen2
template and system prompt, decoding stops at <|im_end|> and special tokens are dropped.
An EVEv1 export (EVE-7B-v1.0 layout) uses EVEv1's resize rule, the vicuna_v1 template and
stops at </s>.
The answer is the last line of stdout, line breaks escaped as \\n (backslashes as \\\\).

Also run as ``eve-generate`` (console script of an installed package) or
``python tools/generate.py`` (a wrapper kept for source checkouts).
"""

import argparse
import os
import sys

from eve_megatron.data.templates import TEMPLATES
from eve_megatron.hf.generation import answer, escape_line, load_export
from eve_megatron.hf.eve_image_rules import RESIZE_MODES


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="exported HF folder")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--template", choices=TEMPLATES, default=None,
                   help="default: the export's family's (qwen2; EVEv1: vicuna_v1)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the folder's files against its SHA256SUMS")
    p.add_argument("--resize", choices=RESIZE_MODES, default=None,
                   help="infer: the release's inference resize (the export's default); "
                        "train: AnyRatio")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the tool on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    a = parse_args(argv)
    try:
        for path in a.image:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image {path!r} does not exist")
        model, tokenizer, image_processor = load_export(a.model, verify=not a.no_verify)
        text, _ = answer(model, tokenizer, image_processor, a.prompt, a.image, a.max_new_tokens,
                         a.template, a.resize)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"generate: error: {exc}", file=sys.stderr)
        return 2
    print(escape_line(text), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
