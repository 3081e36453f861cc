"""EVEv1 under tensor parallelism with sequence parallelism and under pipeline parallelism
(with virtual stages, and PP x TP + SP): token loss, PAL loss and every gradient equal the
single-process reference (fp32, <= 1e-5). The PAL's taps are gathered over the
sequence-parallel ranks and reach the last pipeline stage in the carry."""

import pytest

from eve_megatron.launch import run_distributed

TOL = 1e-5


@pytest.mark.parametrize("sequence_parallel,hd", [(True, False), (True, True)])
def test_tp2_sp_matches_reference(sequence_parallel, hd):
    results = run_distributed("tests.distributed.evev1_workers:tp_sp_step", 2, tp=2,
                              sequence_parallel=sequence_parallel, hd=hd)
    for r in results:
        assert abs(r["ce"] - r["ref_ce"]) <= TOL * r["ref_ce"], r
        assert abs(r["pal"] - r["ref_pal"]) <= TOL * r["ref_pal"], r
        assert r["grad_err"][0] <= TOL, r["grad_err"]


def _check_pp(results, layouts):
    assert len(results) == len(layouts)
    for layout, r in zip(layouts, results):
        assert r["layout"] == layout and r["carry_factor"] > 1, r
        if "ce" in r:  # the last pipeline stage
            assert abs(r["ce"] - r["ref_ce"]) <= TOL * r["ref_ce"], r
            assert abs(r["pal"] - r["ref_pal"]) <= TOL * r["ref_pal"], r
        assert r["grad_err"][0] <= TOL, (layout, r["grad_err"])


@pytest.mark.parametrize("hd", [False, True])
def test_pp2_and_virtual_pp_match_reference(hd):
    """PP2 (taps 0, 1 carried; 2 is the last stage's input) and PP2 x 2 virtual stages (taps
    0, 1, 2 hop over three chunks): two micro-batches through Megatron's schedules."""
    layouts = [(1, 2, None, False), (1, 2, 2, False)]
    results = run_distributed("tests.distributed.evev1_workers:pp_step", 2, layouts=layouts, hd=hd)
    assert [r["carry_factor"] for r in results[0]] == [3, 4]
    assert sum("ce" in r[0] for r in results) == 1  # one last stage
    for rank in results:
        _check_pp(rank, layouts)


def test_pp2_tp2_sp_matches_reference():
    """PP2 x TP2 with sequence parallelism: each rank carries its sequence chunk of every tap."""
    layouts = [(2, 2, None, True)]
    results = run_distributed("tests.distributed.evev1_workers:pp_step", 4, layouts=layouts)
    assert sum("ce" in r[0] for r in results) == 2  # the last stage's two TP ranks
    for rank in results:
        _check_pp(rank, layouts)
