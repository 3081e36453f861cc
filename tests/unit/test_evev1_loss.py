"""EVEv1's objective is CE per supervised token + 1.0 x PAL per image of the global batch:
the trainer weighs each micro-batch's PAL sum by tokens / images of the whole step, and
Megatron's division by the step's tokens then leaves exactly that."""

from types import SimpleNamespace

import pytest
import torch

from eve_megatron.training.data_setup import StepData
from eve_megatron.training.loop import Trainer
from eve_megatron.training.step import loss_func


def _micro(tokens: int, images: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 16)
    mask[0, :tokens] = 1
    return {"loss_mask": mask, "teacher_valid": torch.ones(images, 576, dtype=torch.bool),
            "cu_seqlens": torch.tensor([0, 16], dtype=torch.int32), "is_vision": mask.bool() & False,
            "tokens": torch.zeros(1, 16, dtype=torch.long),
            "per_token": torch.rand(1, 16, generator=g), "pal_sum": torch.rand((), generator=g) * images}


def test_step_objective_is_ce_per_token_plus_pal_per_image(megatron_world):
    micro = [_micro(5, 1, 0), _micro(11, 3, 1), _micro(2, 0, 2)]
    data = StepData(iter(micro), len(micro))
    assert Trainer._weigh_pal(SimpleNamespace(_device=lambda: "cpu"), data)
    weight = 18 / 4  # tokens / images of the step
    total, tokens = 0.0, 0
    for b in micro:
        assert b["pal_weight"] == pytest.approx(weight)
        n_img = b["teacher_valid"].shape[0]
        loss, n, report = loss_func(b["loss_mask"], (b["per_token"], b["pal_sum"], n_img),
                                    pal_weight=b["pal_weight"])
        total, tokens = total + float(loss), tokens + int(n)
        assert report["pal loss"].tolist() == pytest.approx([float(b["pal_sum"]), n_img])
    ce = sum(float((b["per_token"] * b["loss_mask"]).sum()) for b in micro) / 18
    pal = sum(float(b["pal_sum"]) for b in micro) / 4
    assert total / tokens == pytest.approx(ce + pal, rel=1e-6)  # what Megatron's division leaves
    with pytest.raises(ValueError, match="pal_weight"):
        loss_func(micro[0]["loss_mask"], (micro[0]["per_token"], micro[0]["pal_sum"], 1))


def test_evev2_batches_have_no_pal(megatron_world):
    batch = _micro(4, 0, 3)
    del batch["teacher_valid"]
    assert not Trainer._weigh_pal(SimpleNamespace(_device=lambda: "cpu"),
                                  StepData(iter([batch]), 1))
    loss, n, report = loss_func(batch["loss_mask"], batch["per_token"])
    assert set(report) == {"lm loss"} and int(n) == 4
