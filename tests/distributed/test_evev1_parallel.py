"""EVEv1 under tensor parallelism with sequence parallelism: token loss, PAL loss and every
gradient equal the single-process reference (fp32, <= 1e-5). The PAL's taps are gathered
over the sequence-parallel ranks."""

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
