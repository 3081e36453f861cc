"""Everything of an HF export besides the weights: configs, the shipped code, the tokenizer
with the release's chat template, a README.

The shipped code (``CODE_FILES``) depends on ``torch``, ``transformers``, ``numpy`` and
``PIL`` only, so an export is used without ``eve_megatron``: model, processor, chat
template, ``image-text-to-text`` pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Tuple

from eve_megatron.data.images import ImageConfig
from eve_megatron.hf import config_map
from eve_megatron.hf.eve_prompt import CHAT_TEMPLATE, IM_END

CODE_FILES = ("configuration_eve_qwen2.py", "modeling_eve_qwen2.py", "eve_layers.py",
              "eve_generation.py", "eve_image_rules.py", "eve_prompt.py",
              "image_processing_eve_qwen2.py", "processing_eve_qwen2.py")
"""The modules copied into every export (they import only each other, never eve_megatron)."""
TOKENIZER_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens")
DEFAULT_IMAGES = {"max_image_size": ImageConfig.max_size, "alpha": ImageConfig.alpha}
"""Used when the checkpoint records no image settings and no flag gives them: the
preprocessing defaults."""


def write_json(folder: str, name: str, value: dict) -> None:
    """``folder/name`` as indented JSON."""
    with open(os.path.join(folder, name), "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def write_side_files(folder: str, final: str, fields: dict, dtype_name: str,
                     tokenizer: Optional[str], images: dict,
                     vision_tower: Optional[str] = None) -> None:
    """config.json, the processor configs, the code, the tokenizer, generation config, README.

    ``final`` is where the folder will live (``mm_vision_tower`` defaults to its absolute
    path, so the official code finds the image processor config from any directory).
    """
    eos = bos = None
    if tokenizer:
        eos, bos = copy_tokenizer(tokenizer, folder)
    tower = vision_tower or os.path.abspath(final)
    write_json(folder, "config.json", config_map.hf_config(
        fields, dtype_name, tower, bos_token_id=bos, eos_token_id=eos))
    write_json(folder, "preprocessor_config.json", config_map.preprocessor_config(
        images["max_image_size"], fields["patch_stride"], fields["dense_stride"], images["alpha"]))
    write_json(folder, "processor_config.json", config_map.processor_config())
    if eos is not None:
        write_json(folder, "generation_config.json",
                   {"do_sample": False, "eos_token_id": eos, "pad_token_id": eos})
    here = os.path.dirname(os.path.abspath(__file__))
    for name in CODE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(folder, name))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(_readme(images))


def copy_tokenizer(path: str, folder: str) -> Tuple[Optional[int], Optional[int]]:
    """Copy a tokenizer (folder or sentencepiece ``.model``), set the release's chat template
    (replacing the base LLM's), a tokenizer class and a pad token; returns ``(eos, bos)`` ids."""
    from eve_megatron.data.tokenizer import load_tokenizer

    if os.path.isdir(path):
        copied = [n for n in sorted(os.listdir(path)) if n.startswith(TOKENIZER_PREFIXES)]
        if not copied:
            raise FileNotFoundError(f"no tokenizer files in {path!r}")
        for name in copied:
            shutil.copyfile(os.path.join(path, name), os.path.join(folder, name))
    elif os.path.isfile(path) and path.endswith(".model"):
        shutil.copyfile(path, os.path.join(folder, "tokenizer.model"))
    else:
        raise FileNotFoundError(f"tokenizer {path!r} is neither a folder nor a .model file")
    tok = load_tokenizer(path)
    _tokenizer_config(folder, tok)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    return tok.token_id(IM_END), tok.token_id("<|endoftext|>")


def _tokenizer_config(folder: str, tok) -> None:
    """tokenizer_config.json with our chat template, a class (so ``AutoTokenizer`` never needs
    the model's remote code) and a pad token for batched generation."""
    path = os.path.join(folder, "tokenizer_config.json")
    cfg = {}
    if os.path.isfile(path):
        with open(path) as f:
            cfg = json.load(f)
    fast = os.path.isfile(os.path.join(folder, "tokenizer.json"))
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast" if fast else "LlamaTokenizer")
    cfg["chat_template"] = CHAT_TEMPLATE
    if not cfg.get("pad_token"):
        for candidate in ("<|endoftext|>", IM_END, "<unk>"):
            if tok.token_id(candidate) is not None:
                cfg["pad_token"] = candidate
                break
    if not cfg.get("eos_token") and tok.token_id(IM_END) is not None:
        cfg["eos_token"] = IM_END
    write_json(folder, "tokenizer_config.json", cfg)


def transformers_range() -> str:
    """The transformers requirement eve_megatron declares (setup.py; CI tests both ends)."""
    from importlib import metadata

    try:
        reqs = metadata.requires("eve_megatron") or []
    except metadata.PackageNotFoundError:
        return "(see eve_megatron's setup.py)"
    spec = next((r for r in reqs if r.startswith("transformers")), "transformers")
    return spec[len("transformers"):].split(";")[0].strip() or "(any)"


def _readme(images: dict) -> str:
    return f"""# EVE (exported by eve_megatron)

```python
from transformers import AutoModelForCausalLM, AutoProcessor
processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
inputs = processor(images=image, text=processor.apply_chat_template(messages))
out = model.generate(**inputs, max_new_tokens=64)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```

- transformers {transformers_range()} (tested at the lowest and the newest release); the code
  here needs only torch, transformers, numpy and Pillow.
- Images: resized by the inference rule to an area of about {images["max_image_size"]}^2
  (`resize_mode="train"` for the AnyRatio training rule), alpha rule `{images["alpha"]}`
  (as in training). Image positions in `input_ids` hold -200: decode with the processor.
- `mm_vision_tower` in config.json is for the official EVEv2 code; it names this folder's
  absolute path at export time (update it if you move the folder).
"""
