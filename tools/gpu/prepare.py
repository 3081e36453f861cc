#!/usr/bin/env python
"""Assemble, on a CPU machine with the package index, what the lent GPU machine lacks, cut
into device calls that each carry at most ``--bundle-mib`` of our files.

The GPU machine (see docs/gpu_results.md): one H100/H200, Python 3.12, torch 2.11+cu130,
no network, at most 64 MiB of our files per call (the working tree included), files kept
between calls while the machine stays warm. So:

1. ``downloads/``: cp312 wheels of every package eve_megatron needs besides torch (the
   versions installed here, so the set is one that works together), our own cp312 wheel
   (the C++ extension, built with pyenv's Python 3.12), and with ``--te`` Transformer
   Engine: the core wheel ``transformer-engine-cu13`` and the sources of its PyTorch
   extension (built on the GPU machine by ``run.sh``: no prebuilt wheel exists);
2. ``callNN/``: the files packed into bundles of at most ``--bundle-mib``; a file larger than
   that travels as verified pieces (``pieces.py``), a bundle apiece;
3. ``plan.json``: the device calls, in order: ``carry: [".gpukit/call01"]`` ... and last
   ``bash tools/gpu/run.sh`` (which joins the pieces, installs with ``--no-index``, runs).

    python tools/gpu/prepare.py --te                  # downloads (once), bundles, plan
    python tools/gpu/prepare.py --skip-download       # re-bundle what downloads/ holds
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from pieces import MIB, split  # noqa: E402

NOT_CARRIED = re.compile(
    r"^(torch|triton|nvidia-.*|cuda-.*|eve[-_]megatron|pip|setuptools|wheel)$", re.I)
"""Distributions the GPU image has (torch and its CUDA libraries) or that are ours."""
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "--platform", "any"]
TE_VERSION = "2.20.2"
"""Transformer Engine release the kit carries (``--te-version``): core wheel + torch sources."""
BUILD_TOOLS = ("pybind11", "setuptools", "wheel", "ninja", "packaging")


GPU_MACHINE = {"python_version": "3.12", "python_full_version": "3.12.0",
               "implementation_name": "cpython", "platform_python_implementation": "CPython",
               "sys_platform": "linux", "platform_system": "Linux",
               "platform_machine": "x86_64", "os_name": "posix"}
"""Environment markers of the GPU machine (e.g. setup.py's megatron-core line for 3.12)."""


def _holds_on_gpu_machine(marker: str, extras) -> bool:
    from packaging.markers import Marker

    return any(Marker(marker).evaluate({**GPU_MACHINE, "extra": e}) for e in (extras or {""}))


def requirement_closure(root: str = "eve_megatron", extras=("test",)) -> Dict[str, str]:
    """``{distribution: installed version}`` of everything ``root`` needs on the GPU
    machine (markers evaluated for it; torch's stack and the packaging tools left out).
    The versions are the ones installed here: run from a Python 3.12 environment to carry
    the megatron-core release setup.py asks for there (0.19.x); from 3.11 the kit carries
    0.16.1, which eve_megatron also supports."""
    todo, seen = [(root, set(extras))], {}
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = dist.metadata["Name"]
        if key in seen:
            continue
        seen[key] = dist.version
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            if marker.strip() and not _holds_on_gpu_machine(marker, wanted):
                continue
            dep = re.match(r"[A-Za-z0-9._-]+", spec.strip())
            if dep:
                todo.append((dep.group(0), set()))
    return {k: v for k, v in seen.items() if not NOT_CARRIED.match(k) and k != root}


def download(out: str, te: bool, te_version: str = TE_VERSION) -> List[str]:
    """Fill ``out`` (idempotent: files already there are kept); returns what failed."""
    os.makedirs(out, exist_ok=True)
    pins = requirement_closure()
    failed = []
    for name, version in sorted(pins.items()):
        failed += _pip(["download", "--no-deps", "-d", out, *PLATFORM, f"{name}=={version}"], name)
    failed += _pip(["download", "--no-deps", "-d", out, *PLATFORM, *BUILD_TOOLS], "build tools")
    py312 = os.path.expanduser("~/.pyenv/versions/3.12.1/bin/python")
    if os.path.exists(py312):
        failed += _pip(["wheel", "--no-deps", "-w", out, ROOT], "eve_megatron cp312", py312)
    else:
        failed.append("eve_megatron cp312 (no Python 3.12 here: run.sh builds the extension)")
    if te:
        failed += _pip(["download", "--no-deps", "-d", out, *PLATFORM,
                        f"transformer-engine-cu13=={te_version}", f"transformer-engine=={te_version}"],
                       "transformer-engine core")
        failed += fetch_sdist("transformer-engine-torch", te_version, out)
    with open(os.path.join(out, "requirements.txt"), "w") as f:
        f.write("".join(f"{k}=={v}\n" for k, v in sorted(pins.items())))
    return failed


def fetch_sdist(name: str, version: str, out: str,
                index: str = "https://pypi.org/simple") -> List[str]:
    """Download a source archive from the index's simple page, sha256-checked (``pip download``
    would try to build its metadata, which for TE's torch extension needs CUDA torch)."""
    import hashlib
    import urllib.parse
    import urllib.request

    stem = f"{name.replace('-', '_')}-{version}.tar.gz"
    if os.path.isfile(os.path.join(out, stem)):
        return []
    try:
        with urllib.request.urlopen(f"{index}/{name}/", timeout=120) as r:
            page = r.read().decode()
        match = re.search(r'href="([^"]*?/%s)#sha256=([0-9a-f]{64})"' % re.escape(stem), page)
        if not match:
            raise ValueError(f"{stem} is not on {index}/{name}/")
        url = urllib.parse.urljoin(f"{index}/{name}/", match.group(1))
        with urllib.request.urlopen(url, timeout=600) as r:
            data = r.read()
        if hashlib.sha256(data).hexdigest() != match.group(2):
            raise ValueError(f"{stem}: sha256 mismatch")
    except (OSError, ValueError) as exc:
        print(f"prepare: {name} sources: {exc}", file=sys.stderr)
        return [f"{name} sources"]
    with open(os.path.join(out, stem + ".tmp"), "wb") as f:
        f.write(data)
    os.replace(os.path.join(out, stem + ".tmp"), os.path.join(out, stem))
    return []


def _pip(args: List[str], what: str, python: str = sys.executable) -> List[str]:
    proc = subprocess.run([python, "-m", "pip", *args, "-q"], capture_output=True, text=True)
    if proc.returncode:
        print(f"prepare: {what}: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return [what]
    return []


def bundle(downloads: str, kit: str, bundle_bytes: int) -> List[dict]:
    """Pack ``downloads`` into ``kit/callNN`` folders of at most ``bundle_bytes``; larger files
    go as pieces. Returns the device calls (first to last), each with what it carries."""
    for old in glob.glob(os.path.join(kit, "call*")):
        shutil.rmtree(old)
    files = sorted((f for f in glob.glob(os.path.join(downloads, "*")) if os.path.isfile(f)),
                   key=os.path.getsize, reverse=True)
    calls: List[List[str]] = []
    sizes: List[int] = []
    sealed: List[bool] = []  # a call that carries a piece carries nothing else
    staged = os.path.join(kit, "staged_pieces")
    shutil.rmtree(staged, ignore_errors=True)
    for path in files:
        size = os.path.getsize(path)
        if size > bundle_bytes:
            manifest = split(path, staged, bundle_bytes - 4096)  # room for the manifest
            with open(manifest) as f:
                parts = [os.path.join(staged, p["file"]) for p in json.load(f)["pieces"]]
            for part in parts:
                calls.append([part])
                sizes.append(os.path.getsize(part))
                sealed.append(True)
            calls[-1].append(manifest)
            continue
        slot = next((i for i, s in enumerate(sizes)
                     if not sealed[i] and s + size <= bundle_bytes), None)
        if slot is None:
            calls.append([])
            sizes.append(0)
            sealed.append(False)
            slot = len(calls) - 1
        calls[slot].append(path)
        sizes[slot] += size
    plan = []
    for i, members in enumerate(calls, 1):
        folder = os.path.join(kit, f"call{i:02d}")
        os.makedirs(folder)
        for path in members:
            shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
        plan.append({"call": i, "carry": [os.path.relpath(folder, ROOT)], "bytes": sizes[i - 1],
                     "files": sorted(os.path.basename(p) for p in members)})
    shutil.rmtree(staged, ignore_errors=True)
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, ".gpukit"), help="the kit folder (ignored by git)")
    p.add_argument("--te", action="store_true", help="also Transformer Engine (~280 MB, 5+ calls)")
    p.add_argument("--te-version", default=TE_VERSION)
    p.add_argument("--bundle-mib", type=float, default=56.0,
                   help="MiB per call (64 minus the working tree and a margin)")
    p.add_argument("--skip-download", action="store_true", help="only re-bundle downloads/")
    a = p.parse_args(argv)
    downloads = os.path.join(a.out, "downloads")
    failed = [] if a.skip_download else download(downloads, a.te, a.te_version)
    if not os.path.isdir(downloads):
        print(f"prepare: error: {downloads} does not exist (run without --skip-download)",
              file=sys.stderr)
        return 2
    plan = bundle(downloads, a.out, int(a.bundle_mib * MIB))
    plan.append({"call": len(plan) + 1, "carry": [], "command": "bash tools/gpu/run.sh"})
    with open(os.path.join(a.out, "plan.json"), "w") as f:
        json.dump(plan, f, indent=1)
    print(json.dumps({"calls": len(plan), "bundled_bytes": sum(c.get("bytes", 0) for c in plan),
                      "failed": failed, "plan": os.path.join(a.out, "plan.json")}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
