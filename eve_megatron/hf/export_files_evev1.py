"""Everything of an EVEv1 export besides the weights: the EVE-7B-v1.0 ``config.json``, the
image processor config, the sentencepiece tokenizer files, the generation config, the
shipped code and a README.

The shipped code (``CODE_FILES``) depends on torch, transformers, numpy and PIL only.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from eve_megatron.hf import config_map_evev1
from eve_megatron.hf.eve_image_rules import CLIP_MEAN, CLIP_STD
from eve_megatron.hf.evev1_image_rules import BASE_SIZE, TEACHER_PATCH
from eve_megatron.hf.export_files import CODE_FILES as EVEV2_CODE_FILES
from eve_megatron.hf.export_files import TOKENIZER_PREFIXES, write_json

CODE_FILES = EVEV2_CODE_FILES + ("configuration_eve_llama.py", "modeling_eve_llama.py",
                                 "evev1_layers.py", "evev1_image_rules.py",
                                 "image_processing_eve_llama.py")
"""EVEv1's model reuses EVEv2's decoder, masks and generation code, so both sets ship."""
LLAMA_SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
"""The release's tokenizer: pad = unk (id 0), bos 1, eos 2 (reference §4)."""


def preprocessor_config(ratio: int, patch_stride: int, conv_stride: int) -> dict:
    """The keys of the release's ``openai/eve-patch14-anypixel-{672,1344}`` processor folders
    (reference §1, [inferred] values) plus ``auto_map``."""
    return {"auto_map": {"AutoImageProcessor": config_map_evev1.AUTO_MAP["AutoImageProcessor"]},
            "image_processor_type": "EVEv1ImageProcessor",
            "image_size": BASE_SIZE * ratio, "image_size_clip": BASE_SIZE,
            "patch_stride": patch_stride, "conv_stride": conv_stride,
            "patch_stride_clip": TEACHER_PATCH, "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD), "do_resize": False, "do_normalize": True, "resample": 3}


def write_side_files_evev1(folder: str, fields: dict, dtype_name: str, tokenizer: Optional[str],
                           vocab_size: int, ratio: int = 2) -> None:
    """config.json, preprocessor_config.json, the tokenizer, generation config, code, README."""
    if ratio not in (2, 4):
        raise ValueError(f"EVEv1 ratio must be 2 (672) or 4 (HD 1344), got {ratio}")
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if tokenizer:
        ids = copy_sentencepiece_tokenizer(tokenizer, folder)
    write_json(folder, "config.json",
               config_map_evev1.hf_config(fields, dtype_name, vocab_size, ratio, **ids))
    write_json(folder, "preprocessor_config.json",
               preprocessor_config(ratio, fields["patch_stride"], fields["dense_stride"]))
    write_json(folder, "generation_config.json",
               {"do_sample": False, **ids})
    here = os.path.dirname(os.path.abspath(__file__))
    for name in CODE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(folder, name))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(_README.format(size=BASE_SIZE * ratio))


def copy_sentencepiece_tokenizer(path: str, folder: str) -> dict:
    """Copy a Llama sentencepiece tokenizer (``.model`` file, or a folder's tokenizer files)
    and write a ``tokenizer_config.json`` (``LlamaTokenizer``, the release's special
    tokens); returns the bos/eos/pad ids."""
    from eve_megatron.data.tokenizer import load_tokenizer

    if os.path.isdir(path):
        copied = [n for n in sorted(os.listdir(path)) if n.startswith(TOKENIZER_PREFIXES)]
        if "tokenizer.model" not in copied:
            raise FileNotFoundError(f"no sentencepiece tokenizer.model in {path!r} (EVEv1 uses "
                                    "the Llama tokenizer)")
        for name in copied:
            shutil.copyfile(os.path.join(path, name), os.path.join(folder, name))
    elif os.path.isfile(path) and path.endswith(".model"):
        shutil.copyfile(path, os.path.join(folder, "tokenizer.model"))
    else:
        raise FileNotFoundError(f"tokenizer {path!r} is neither a folder nor a .model file")
    tok = load_tokenizer(folder)
    ids = {f"{k[:-6]}_token_id": tok.token_id(v) for k, v in LLAMA_SPECIAL.items()
           if k != "unk_token"}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"tokenizer {path!r} lacks the Llama special tokens for {missing}")
    cfg = {}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            cfg = json.load(f)
    cfg.update({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                "add_eos_token": False, "legacy": True, **LLAMA_SPECIAL})
    write_json(folder, "tokenizer_config.json", cfg)
    return ids


_README = """# EVEv1 (exported by eve_megatron; EVE-7B-v1.0 layout, {size} px)

```python
from transformers import AutoImageProcessor, AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
images = AutoImageProcessor.from_pretrained(DIR, trust_remote_code=True)
```

- Prompt: vicuna_v1 (`<s>SYSTEM USER: <image>\\nQUESTION ASSISTANT:`), the image's
  `1 + h(w+1)` positions (h, w = image sides / 28) hold -200 in `input_ids`; greedy, stop at
  `</s>`. `python -m eve_megatron.tools.generate --model DIR --image X --prompt Q` does all this.
- Weights under the released names: `model.vision_tower.*` (patch embedding layer),
  `model.mm_projector.*`, `model.vision_tower_compressor.*` (PAL, training only) and
  `model.vision_clip.backbone.vision_model.*` (the frozen CLIP teacher's layers up to the
  tapped one; training only).
"""
