"""Rank functions and builders of the checkpoint-conversion tests."""

from __future__ import annotations

import json
import os

import torch
from megatron.core import tensor_parallel

from eve_megatron.hf.importer import import_rank, read_source
from eve_megatron.models.eve import eve_config
from eve_megatron.models.eve.config import config_from_fields
from eve_megatron.models.eve.sharding import load_full_state_dict
from eve_megatron.parallel import ParallelConfig, initialize_parallel
from eve_megatron.training import checkpointing
from eve_megatron.training.model_setup import build_model_chunks
from tests.distributed.model_workers import SEQ, _logits_step, _run
from tests.reference_eve import RefShape, make_weights, to_megatron

QWEN2_TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, rope_theta=10000.0,
                  max_position_embeddings=4096, rms_norm_eps=1e-6)


def make_qwen2(folder: str, tied: bool, seed: int, fmt: str = "safetensors"):
    """A tiny random ``transformers`` Qwen2ForCausalLM saved in ``folder`` (``fmt``:
    sharded ``safetensors`` with an index, or a single ``bin``); returns the model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=tied, **QWEN2_TINY)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # O(1) weights: a wrong layout cannot hide
            std = 0.5 if "embed" in name else 0.2 if "lm_head" in name else 0.1
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else std * noise)
    if fmt == "safetensors":
        model.save_pretrained(folder, max_shard_size="60KB")
    else:
        os.makedirs(folder, exist_ok=True)
        model.config.save_pretrained(folder)
        state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["model_type"] == "qwen2"
    return model


def text_tokens(batch: int = 2, seed: int = 3) -> torch.Tensor:
    """Random text tokens ``[batch, SEQ]`` of the tiny vocabulary."""
    return torch.randint(0, QWEN2_TINY["vocab_size"], (batch, SEQ),
                         generator=torch.Generator().manual_seed(seed))


def import_then_logits(cases, tp: int, pp: int):
    """Per case: import the HF folder at TP x PP (this world), load the saved checkpoint into
    fresh chunks and return the full logits of the text batch (last stage, else None)."""
    out = []
    for case in cases:
        fields = read_source(case["hf_dir"], case["decoupling"], vision_hidden_size=32)
        import_rank(case["hf_dir"], case["save"], tp, pp, fields, dtype="fp32")
        initialize_parallel(ParallelConfig(tp, pp), seed=99)  # fresh random chunks
        cfg = config_from_fields(fields, tensor_model_parallel_size=tp,
                                 pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32)
        chunks = build_model_chunks(cfg)
        checkpointing.load_checkpoint(case["save"], chunks)
        tokens = text_tokens()
        batch = {"tokens": tokens, "position_ids": torch.arange(SEQ).repeat(tokens.shape[0], 1),
                 "is_vision": torch.zeros_like(tokens, dtype=torch.bool)}
        logits = _run(chunks, chunks, [batch], tokens.shape[0], forward_only=True, step=_logits_step)
        out.append(tensor_parallel.gather_from_tensor_model_parallel_region(logits[0])
                   if logits else None)
    return out


def reference_full(decoupling: str, tied: bool, seed: int):
    """Full Megatron weights of the reference model (``tests.reference_eve``) of a case."""
    shape = RefShape(decoupling=decoupling, tied=tied)
    return to_megatron(make_weights(shape, seed=seed), shape)


def save_reference(cases):
    """Save each case's reference weights as a Megatron checkpoint at its (TP, PP, VPP)."""
    for case in cases:
        tp, pp, vp = case["layout"]
        initialize_parallel(ParallelConfig(tp, pp, vp))
        cfg = eve_config("tiny", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         virtual_pipeline_model_parallel_size=vp, decoupling=case["decoupling"],
                         share_embeddings_and_output_weights=case["tied"])
        chunks = build_model_chunks(cfg)
        full = reference_full(case["decoupling"], case["tied"], case["seed"])
        for chunk in chunks:
            load_full_state_dict(chunk, full)
        checkpointing.save_checkpoint(case["root"], case["iteration"], chunks, extra=_trainer_state())
    return True


def _trainer_state():
    """Stand-ins for what the trainer saves beside the model (an exporter must skip them)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    moment = torch.full((64,), 0.5)
    return {"optimizer": ShardedTensor.from_rank_offsets(
                "optimizer.state.exp_avg.decoder.final_layernorm.weight", moment, replica_id=rank),
            "rng_state": ShardedObject("rng_state", {"rank": rank}, (world,), (rank,), replica_id=0)}


def conversion_world(imports, saves):
    """One 4-rank run for the conversion tests: save the reference checkpoints, then import
    the HF Qwen2 folders at TP2xPP2 and return their text logits."""
    save_reference(saves)
    return import_then_logits(imports, tp=2, pp=2)
