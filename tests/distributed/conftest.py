"""Fixtures of the distributed tests."""

import pytest
import torch

from eve_megatron.launch import run_distributed
from tests.distributed.hf_workers import make_qwen2, text_tokens
from tests.unit._data_helpers import make_hf_tokenizer

REFERENCE_CASES = {"v2": dict(decoupling="all", tied=False, seed=31, layout=(2, 2, None)),
                   "v15": dict(decoupling="mlp", tied=True, seed=32, layout=(1, 2, 2))}
"""Megatron reference models of the export tests: EVEv2.0 untied saved at TP2xPP2, EVEv1.5
tied saved at PP2 with 2 virtual stages (data parallel 2); layout = (TP, PP, VPP)."""
QWEN2_CASES = ((False, "safetensors", "none"), (True, "bin", "all"))
"""HF Qwen2 imports: (tied, file format, decoupling asked for)."""


@pytest.fixture(scope="session")
def hf_world(tmp_path_factory):
    """One 4-rank run shared by the conversion tests (rank start-up dominates their cost).

    Returns ``tmp`` (folder), ``megatron`` (case -> checkpoint root at the case's layout),
    ``qwen2`` (list of (transformers logits, last-stage Megatron logits per rank)) and
    ``tokenizer`` (a tiny HF tokenizer folder).
    """
    tmp = tmp_path_factory.mktemp("hf_world")
    saves = [dict(case, root=str(tmp / f"megatron_{key}"), iteration=5)
             for key, case in REFERENCE_CASES.items()]
    imports, references = [], []
    for tied, fmt, decoupling in QWEN2_CASES:
        hf_dir = str(tmp / f"qwen2_tied{tied}")
        model = make_qwen2(hf_dir, tied, seed=11 + tied, fmt=fmt)
        with torch.no_grad():
            references.append(model(input_ids=text_tokens()).logits)
        imports.append({"hf_dir": hf_dir, "save": str(tmp / f"imported_tied{tied}"),
                        "decoupling": decoupling})
    per_rank = run_distributed("tests.distributed.hf_workers:conversion_world", 4,
                               imports=imports, saves=saves)
    qwen2 = [(ref, [r[k] for r in per_rank]) for k, ref in enumerate(references)]
    return {"tmp": tmp, "megatron": {k: s["root"] for k, s in zip(REFERENCE_CASES, saves)},
            "qwen2": qwen2, "tokenizer": make_hf_tokenizer(str(tmp / "tokenizer"))}
