"""EVEv1 through the real trainer on a preprocessed EVEv1 dataset (tiny preset, random
teacher): token loss and PAL loss are logged separately and both fall; the prealign set
(PEL, projector, PAL) leaves every LLM weight bit-identical; the teacher never changes; the
1:1 weight of PAL and token loss holds at any micro-batch split and data-parallel size; PP2
(and 2 virtual stages) trains like PP1."""

import pytest
import torch

from eve_megatron.data.preprocess import PreprocessConfig, run_preprocess
from eve_megatron.data.images import ImageConfig
from eve_megatron.launch import run_distributed
from tests.unit._data_helpers import make_llama_sp_tokenizer
from tests.unit.test_data_evev1_pipeline import _inputs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evev1_train")
    cfg = PreprocessConfig(inputs=[_inputs(tmp)], output_prefix=str(tmp / "ds"),
                           tokenizer=make_llama_sp_tokenizer(str(tmp / "tok")),
                           template="vicuna_v1", model_family="evev1", evev1_ratio=2,
                           image_root=str(tmp), seq_length=1024, workers=0, progress=False,
                           image=ImageConfig(encode_format="png"))
    assert run_preprocess(cfg)["written"] == 3
    return str(tmp / "ds")


def _argv(data, *flags):
    return ["--model-preset", "evev1-tiny", "--data-path", data, "--seq-length", "1024",
            "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "8",
            "--lr", "3e-3", "--lr-warmup-iters", "0", "--num-workers", "0", "--log-interval", "1",
            "--no-progress", *map(str, flags)]


def _is_llm(name):
    return name.startswith(("embedding.word_embeddings.", "decoder.", "output_layer."))


def test_both_losses_fall_and_the_teacher_stays_frozen(data):
    r = run_distributed("tests.functional.evev1_workers:train", 1, argv=_argv(data))[0]
    token, pal = zip(*r["losses"])
    assert all(p is not None for p in pal)
    assert token[-1] < 0.8 * token[0] and pal[-1] < 0.8 * pal[0], r["losses"]
    for name, changed in r["changed"].items():
        assert changed == (not name.startswith("teacher.")), name


def test_prealign_trains_only_pel_projector_and_pal(data):
    r = run_distributed("tests.functional.evev1_workers:train", 1,
                        argv=_argv(data, "--trainable", "vision", "--train-iters", 3))[0]
    for name, changed in r["changed"].items():
        vision = name.startswith(("embedding.patch_embedding.", "pal."))
        assert changed == vision, name
        assert not (_is_llm(name) and changed), f"{name}: an LLM weight moved in prealign"
    assert r["losses"][-1][1] < r["losses"][0][1]


def test_pal_weight_is_independent_of_the_split(data):
    runs = {
        "dp1_mbs2": run_distributed("tests.functional.evev1_workers:train", 1,
                                    argv=_argv(data, "--micro-batch-size", 2,
                                               "--train-iters", 2))[0],
        "dp1_ga2": run_distributed("tests.functional.evev1_workers:train", 1,
                                   argv=_argv(data, "--train-iters", 2))[0],
        "dp2": run_distributed("tests.functional.evev1_workers:train", 2,
                               argv=_argv(data, "--train-iters", 2))[0],
    }
    ref = runs["dp1_mbs2"]
    for key, r in runs.items():
        for (t1, p1), (t2, p2) in zip(ref["losses"], r["losses"]):
            assert abs(t1 - t2) <= 1e-5 * t1 and abs(p1 - p2) <= 1e-5 * p1, key
        for name, w in ref["after"].items():
            err = float((r["after"][name] - w).norm() / w.norm().clamp_min(1e-12))
            assert err <= 2e-5, (key, name, err)


def test_resume_continues_bit_exactly(data, tmp_path):
    whole = run_distributed("tests.functional.evev1_workers:train", 1,
                            argv=_argv(data, "--train-iters", 4, "--save", tmp_path / "a"))[0]
    run_distributed("tests.functional.evev1_workers:train", 1,
                    argv=_argv(data, "--train-iters", 4, "--exit-interval", 2,
                               "--save", tmp_path / "b"))
    rest = run_distributed("tests.functional.evev1_workers:train", 1,
                           argv=_argv(data, "--train-iters", 4, "--load", tmp_path / "b",
                                      "--save", tmp_path / "b"))[0]
    assert rest["losses"] == whole["losses"][2:]  # token and PAL losses, bit for bit
    for name, w in whole["after"].items():
        assert torch.equal(rest["after"][name], w), name


def test_pipeline_parallel_trains_like_pp1(data, tmp_path):
    """PP2 and PP2 x 2 virtual stages from PP1's initial weights: the PAL's taps of earlier
    stages reach the last one in the pipeline carry; token and PAL losses and every weight
    equal PP1's."""
    W = "tests.functional.evev1_workers:train_many"
    init = tmp_path / "init"
    argv = _argv(data, "--train-iters", 3, "--load", init, "--finetune")
    ref = run_distributed(W, 1, argvs=[_argv(data, "--train-iters", 0, "--save", init,
                                             "--no-save-optim"), argv])[0][1]
    pp = ["--pipeline-model-parallel-size", "2"]
    vp = ["--virtual-pipeline-model-parallel-size", "2"]
    ranks = run_distributed(W, 2, argvs=[argv + pp, argv + pp + vp])
    for run in range(2):
        losses = ranks[-1][run]["losses"]
        for (t1, p1), (t2, p2) in zip(ref["losses"], losses, strict=True):
            assert abs(t1 - t2) <= 1e-5 * t1 and abs(p1 - p2) <= 1e-5 * p1, (run, ref["losses"],
                                                                              losses)
        after = {**ranks[0][run]["after"], **ranks[1][run]["after"]}
        assert after.keys() == ref["after"].keys()
        for name, w in ref["after"].items():
            err = float((after[name] - w).norm() / w.norm().clamp_min(1e-12))
            assert err <= 2e-5, (run, name, err)
