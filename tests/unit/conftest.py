"""Fixtures of the unit tests: a real export of the reference model (HF side tests)."""

import json
import os

import pytest
import torch

from tests.reference_eve import RefShape, make_weights, to_megatron

EXPORT_SEED = 41
EXPORT_IMAGES = {"max_image_size": 64, "alpha": "drop"}
"""What the exported checkpoint records about its training images (checked to reach the export)."""


@pytest.fixture(scope="session")
def eve_export(megatron_world, tmp_path_factory):
    """An HF folder exported by ``export_checkpoint`` from a TP1 Megatron checkpoint of the
    reference model (decoupling all, untied, ``tests.reference_eve`` seed ``EXPORT_SEED``)
    with a tiny BPE tokenizer carrying a ChatML chat template (the export must replace it);
    returns ``{"dir", "checkpoint", "weights", "shape"}``."""
    from eve_megatron.hf.export import export_checkpoint
    from eve_megatron.models.eve import EVEModel, eve_config
    from eve_megatron.models.eve.sharding import load_full_state_dict
    from eve_megatron.training import checkpointing
    from tests.unit._data_helpers import make_hf_tokenizer

    tmp = tmp_path_factory.mktemp("eve_export")
    shape = RefShape(decoupling="all", tied=False)
    weights = make_weights(shape, seed=EXPORT_SEED)
    model = EVEModel(eve_config("tiny", decoupling="all"))
    load_full_state_dict(model, to_megatron(weights, shape))
    root = str(tmp / "megatron")
    checkpointing.save_checkpoint(root, 3, [model], images=EXPORT_IMAGES)
    folder = str(tmp / "hf")
    tokenizer = make_hf_tokenizer(str(tmp / "tokenizer"))
    base_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                     "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    with open(os.path.join(tokenizer, "tokenizer_config.json"), "w") as f:  # as a base LLM's
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": base_template}, f)
    with open(os.path.join(tokenizer, "chat_template.jinja"), "w") as f:
        f.write(base_template)
    export_checkpoint(root, folder, tokenizer=tokenizer, progress=False)
    return {"dir": folder, "checkpoint": root, "weights": weights, "shape": shape}


def load_eve(folder: str, **kwargs):
    """``AutoModelForCausalLM`` of an export, fp32, eval mode (the way users load it)."""
    from transformers import AutoModelForCausalLM

    from eve_megatron.hf.generation import dtype_kwarg

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                 **dtype_kwarg(torch.float32), **kwargs)
    return model.eval()
