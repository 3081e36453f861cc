"""A trainer checkpoint written under each supported Megatron-Core release (stored in
``tests/functional/golden/checkpoints/``; ``tests/functional/release_checkpoints.py`` says
how) resumes under the installed release to the uninterrupted run's losses, or, where the
installed release cannot read its layout (0.19's under 0.16.1), stops the trainer with an
error that names the cause before anything is loaded."""

import os

import pytest

from eve_megatron import mcore_compat
from eve_megatron.launch import DistributedRunError
from tests.functional import release_checkpoints as rc
from tests.functional.golden_curve import RTOL, deviations

STORED = rc.stored()


def test_every_supported_series_has_a_stored_checkpoint_of_this_run():
    assert {mcore_compat.parse_version(r)[:2] for r in STORED} == set(mcore_compat.SUPPORTED)
    for release, run in STORED.items():
        assert (run["args"], run["data"], run["saved_at"]) == (rc.ARGS, rc.DATA, rc.SAVED_AT), (
            f"the checkpoint of {release} is of another run: rerun {rc.COMMAND} under it")
        # the two layouts the releases write (what check_checkpoint_layout tells apart)
        has_common_file = os.path.isfile(os.path.join(
            rc.folder(release), f"iter_{rc.SAVED_AT:07d}", mcore_compat.COMMON_STATE_FILE))
        assert has_common_file == (mcore_compat.parse_version(release) < (0, 19, 0)), release


@pytest.mark.parametrize("release", sorted(STORED))
def test_stored_checkpoint_resumes_or_is_refused(release):
    written = mcore_compat.parse_version(release)
    installed = mcore_compat.VERSION
    # 0.19 reads both layouts, 0.16.1 only its own
    readable = written[:2] == installed[:2] or installed >= (0, 19, 0)
    if not readable:
        with pytest.raises(DistributedRunError) as info:
            rc.resume(release)
        assert "CheckpointNeedsNewerMegatronCore" in str(info.value)
        assert "megatron-core >= 0.19" in str(info.value)
        return
    result = rc.resume(release)
    expected = STORED[release]["losses"][rc.SAVED_AT:]
    assert result["start"] == rc.SAVED_AT
    assert len(result["losses"]) == len(expected) == 2
    assert max(deviations(result["losses"], expected)) <= RTOL, (result["losses"], expected)
