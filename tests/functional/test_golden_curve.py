"""The first 20 losses of a fixed tiny fp32 run equal the golden curve stored in the repo
(``tests/functional/golden/loss_curve_tiny.json``; ``tests/functional/golden_curve.py``
says how it was made and how to record it again)."""

from tests.functional.golden_curve import (ARGS, COMMAND, DATA, RTOL, deviations, golden_losses,
                                           load_golden, run_curve, version_key)


def test_first_20_losses_equal_the_golden_curve():
    golden = load_golden()
    assert golden["args"] == ARGS and golden["data"] == DATA, (
        f"the golden file's run differs from tests/functional/golden_curve.py: run {COMMAND}")
    expected, releases, same_releases = golden_losses(golden)
    losses = run_curve(golden["args"], golden["data"])
    assert len(losses) == len(expected) == 20
    dev = deviations(losses, expected)
    if max(dev) <= RTOL:
        return
    rows = "\n".join(f"  iteration {i + 1:2d}: golden {e:.9f}  now {x:.9f}  rel {d:.2e}"
                     for i, (e, x, d) in enumerate(zip(expected, losses, dev)))
    why = ("" if same_releases else
           f"\nNo curve is recorded for the installed {version_key()}; compared with the one of "
           f"{ {k: releases[k] for k in version_key()} }.")
    raise AssertionError(
        f"the loss curve moved by up to {max(dev):.2e} (tolerance {RTOL:.0e}):\n{rows}{why}\n"
        f"If the change of numerics is intended (or these releases round differently), record "
        f"the curve with `{COMMAND}` and commit the file's diff.")
