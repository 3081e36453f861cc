"""examples/quickstart_evev1.sh end to end on a shrunken setting (60 images, 6 + 6 iterations,
2 ranks TP=2 + SP): every step runs, the log shows the token loss and the PAL loss side by
side, the PAL loss falls in prealign (PEL, projector and PAL learn) and the token loss falls
in SFT."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_evev1_quickstart_shows_both_losses_falling(tmp_path):
    env = dict(os.environ, QUICKSTART_DIR=str(tmp_path / "qs"), QUICKSTART_IMAGES="60",
               QUICKSTART_ITERS="6 6")
    out = subprocess.run(["bash", "examples/quickstart_evev1.sh"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    for step in range(1, 5):
        assert f"{step}/4" in out.stdout
    found = dict(re.findall(r"^(prealign|sft): (.*)$", out.stdout, re.M))
    nums = {k: [tuple(map(float, pair)) for pair in re.findall(r"([0-9.]+) -> ([0-9.]+)", v)]
            for k, v in found.items()}  # stage -> [(token first, last), (pal first, last)]
    (pre_tok, pre_pal), (sft_tok, sft_pal) = nums["prealign"], nums["sft"]
    assert pre_pal[1] < 0.8 * pre_pal[0], found  # the PAL aligns to the teacher
    assert sft_tok[1] < 0.9 * sft_tok[0], found  # the whole model learns the text
    assert sft_pal[1] <= pre_pal[0], found
