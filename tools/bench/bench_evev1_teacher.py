#!/usr/bin/env python
"""EVEv1's teacher image: store it in the dataset, or derive it from the student at load time?

For each original size and ratio (2 = 672, 4 = 1344-HD), on smooth random images:

- ``stored``: preprocessing resizes the ORIGINAL to the base size (as the official code)
  and encodes it (JPEG q95, the default); the loader decodes it, pastes it on the 336^2
  canvas and normalises it. Costs: extra bytes per image, extra preprocessing time, load time.
- ``derived``: nothing extra stored; the loader downscales the already decoded student image
  to the base size (bicubic), pastes and normalises. Costs: load time, and pixels that differ
  from the official teacher input (the student is itself a resize of the original).

Times are the best of ``--repeat`` runs (the machine may be shared: the minimum is the
least disturbed), one thread, this process. Prints one JSON line;
nothing is asserted.

    python tools/bench/bench_evev1_teacher.py --repeat 20
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


def _best_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * min(times), 3)


def measure(width: int, height: int, ratio: int, repeat: int) -> dict:
    """Bytes, preprocessing and load costs of both options for one image size."""
    import numpy as np
    import torch
    from PIL import Image

    from eve_megatron.data.images import ImageConfig, decode_rgb, encode_image, prepare_evev1_image
    from eve_megatron.data.pixels import decode_teacher_u8, normalize_blocks
    from eve_megatron.hf import evev1_image_rules as rules
    from tests.unit._data_helpers import random_rgb

    src = Image.fromarray(random_rgb(width, height, 7))
    buf = io.BytesIO()
    src.save(buf, format="JPEG", quality=95)
    raw, cfg = buf.getvalue(), ImageConfig()
    student, hp, wp, teacher, tw, th = prepare_evev1_image(raw, cfg, ratio)
    student_rgb = decode_rgb(student)

    def prep_student_only():
        img = Image.open(io.BytesIO(raw)).convert("RGB")
        encode_image(img.resize(rules.evev1_size(width, height, ratio), Image.BICUBIC), cfg)

    def load_stored():
        canvas, _ = decode_teacher_u8(teacher, tw, th)
        normalize_blocks(canvas[None])

    def derive():
        base = Image.fromarray(student_rgb).resize((tw, th), Image.BICUBIC)
        canvas = torch.from_numpy(rules.teacher_canvas(np.asarray(base)).transpose(2, 0, 1).copy())
        rules.teacher_valid(tw, th)
        normalize_blocks(canvas[None])
        return np.asarray(base)

    official = np.asarray(src.resize((tw, th), Image.BICUBIC)).astype(int)
    diff = np.abs(derive().astype(int) - official)
    return {"size": f"{width}x{height}", "ratio": ratio, "student_bytes": len(student),
            "teacher_bytes": len(teacher),
            "extra_bytes_pct": round(100 * len(teacher) / len(student), 1),
            "preprocess_ms_student_only": _best_ms(prep_student_only, repeat),
            "preprocess_ms_with_teacher": _best_ms(lambda: prepare_evev1_image(raw, cfg, ratio),
                                                     repeat),
            "load_ms_stored": _best_ms(load_stored, repeat),
            "load_ms_derived": _best_ms(derive, repeat),
            "load_ms_student_decode": _best_ms(lambda: decode_rgb(student), repeat),
            "derived_vs_official_mean_abs": round(float(diff.mean()), 3),
            "derived_vs_official_max_abs": int(diff.max())}


def main(argv=None) -> int:
    """Run the measurements and print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = [measure(w, h, r, a.repeat) for (w, h) in ((640, 480), (1024, 683), (500, 1200))
            for r in (2, 4)]
    print(json.dumps({"results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
