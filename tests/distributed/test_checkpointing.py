"""Distributed checkpoints: any layout loads any other bit-identically; saves are atomic."""

import os

import torch

from eve_megatron.checksums import check_folder
from eve_megatron.launch import run_distributed
from eve_megatron.training import checkpointing

LAYOUTS = [(2, 2, None), (1, 1, None), (1, 2, 2), (2, 1, None)]


def test_reshard_tp2pp2_to_every_layout(tmp_path):
    root = str(tmp_path / "ckpt")
    per_rank = run_distributed("tests.distributed.ckpt_workers:save_then_reshard", 4,
                               root=root, layouts=LAYOUTS)
    saved = {}
    for r in per_rank:
        saved.update(r["saved"])
    for layout in LAYOUTS[1:]:
        loaded = {}
        for r in per_rank:
            iteration, weights = r[str(layout)]
            assert iteration == 7
            loaded.update(weights)
        assert set(loaded) <= set(saved)
        for name, tensor in loaded.items():
            assert torch.equal(tensor, saved[name]), (layout, name)
    assert checkpointing.read_model_fields(root)["num_layers"] == 4
    assert checkpointing.latest_iteration(root) == 7
    assert check_folder(checkpointing.iteration_dir(root, 7), required=True)  # 4 ranks' shares


def test_a_damaged_file_fails_the_load_on_every_rank(tmp_path):
    results = run_distributed("tests.distributed.ckpt_workers:damaged_load", 2,
                              root=str(tmp_path / "ckpt"))
    damaged = results[0]["names"][-1]
    for r in results:
        assert r["error"] is not None and f"{damaged}: damaged" in r["error"], r["error"]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    root = str(tmp_path / "ckpt")
    results = run_distributed("tests.distributed.ckpt_workers:crash_during_save", 2, root=root)
    for r in results:
        assert r["latest"] == 1 and r["iteration"] == 1
        for name, tensor in r["after"].items():
            assert torch.equal(tensor, r["before"][name]), name
    assert not os.path.exists(os.path.join(root, "iter_0000002"))
