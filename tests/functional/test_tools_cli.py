"""The command-line tools are modules of ``eve_megatron.tools``: ``python -m`` runs each one,
setup.py declares their console scripts, and the old ``tools/...py`` paths are thin wrappers
giving the same result (help text, output files, summary, errors, exit codes)."""

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from tests.unit._data_helpers import make_hf_tokenizer, random_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = {"preprocess_data": ("tools/preprocess/preprocess_data.py", "eve-preprocess"),
         "import_hf": ("tools/checkpoint/import_hf.py", "eve-import-hf"),
         "export_hf": ("tools/checkpoint/export_hf.py", "eve-export-hf"),
         "copy_vision_branch": ("tools/checkpoint/copy_vision_branch.py", "eve-copy-vision-branch"),
         "generate": ("tools/generate.py", "eve-generate")}


def _run(args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_module_help_equals_the_wrapper_help(name, tmp_path):
    """``python -m eve_megatron.tools.NAME --help`` from any folder (the package, not the
    checkout's cwd, is found); the old path prints the very same text."""
    module = _run(["-m", f"eve_megatron.tools.{name}", "--help"], cwd=str(tmp_path))
    assert module.returncode == 0, module.stderr[-2000:]
    first_line = importlib.import_module(f"eve_megatron.tools.{name}").__doc__.split("\n")[0]
    assert module.stdout.startswith(f"usage: {name}.py ")
    assert " ".join(first_line.split()) in " ".join(module.stdout.split())  # argparse wraps it
    wrapper = _run([TOOLS[name][0], "--help"])
    assert (wrapper.returncode, wrapper.stdout) == (0, module.stdout)


def test_console_scripts_point_at_the_tools():
    """setup.py's entry points name each tool's ``main``; where the package was installed
    with them, the script runs."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    entry = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "entry_points"))
    scripts = dict(s.replace(" ", "").split("=") for s in entry["console_scripts"])
    assert scripts == {script: f"eve_megatron.tools.{name}:main"
                       for name, (_, script) in TOOLS.items()}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))
    installed = shutil.which("eve-preprocess")
    if installed:  # present after `pip install -e .` with this setup.py
        res = subprocess.run([installed, "--help"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "--output-prefix" in res.stdout


def test_wrappers_are_thin_and_only_they_edit_sys_path():
    for name, (path, _) in TOOLS.items():
        text = open(os.path.join(ROOT, path)).read()
        assert len(text.splitlines()) <= 16 and f"from eve_megatron.tools.{name} import main" in text
    package = os.path.join(ROOT, "eve_megatron", "tools")
    for file in os.listdir(package):
        if file.endswith(".py"):
            assert "sys.path" not in open(os.path.join(package, file)).read(), file


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A small LLaVA JSON (three images, one sample pointing at a missing image) + tokenizer."""
    d = tmp_path_factory.mktemp("tools_cli")
    os.makedirs(d / "img")
    recs = []
    for k, (w, h) in enumerate(((64, 48), (40, 90), (120, 33))):
        Image.fromarray(random_rgb(w, h, k)).save(d / "img" / f"{k}.png")
        recs.append({"id": f"s{k}", "image": f"{k}.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat is in picture {k}?"},
            {"from": "gpt", "value": "A red cat sitting on a blue mat."}]})
    recs.append({"id": "gone", "image": "gone.png", "conversations": recs[0]["conversations"]})
    (d / "llava.json").write_text(json.dumps(recs))
    return {"dir": d, "tok": make_hf_tokenizer(str(d / "tok"))}


def _preprocess(launcher, raw, prefix, *extra):
    return _run([*launcher, "--input", str(raw["dir"] / "llava.json"), *extra, "--image-root",
                 str(raw["dir"] / "img"), "--tokenizer", raw["tok"], "--template", "qwen2",
                 "--seq-length", "512", "--max-image-size", "64", "--output-prefix", prefix,
                 "--workers", "0", "--max-bad-fraction", "0.5", "--no-progress"])


def test_wrapper_and_module_preprocess_the_same(raw, tmp_path):
    """One real small dataset through both: identical files, summary, errors and codes."""
    module = ["-m", "eve_megatron.tools.preprocess_data"]
    wrapper = [TOOLS["preprocess_data"][0]]
    runs = {k: _preprocess(launcher, raw, str(tmp_path / k))
            for k, launcher in (("m", module), ("w", wrapper))}
    summaries = {}
    for k, res in runs.items():
        assert res.returncode == 0, res.stderr[-2000:]
        summaries[k] = json.loads(res.stdout.strip().splitlines()[-1])
        for key in ("seconds", "output", "report"):
            summaries[k].pop(key)
    assert summaries["m"] == summaries["w"] and summaries["m"]["written"] == 3
    assert summaries["m"]["skipped_by_reason"] == {"missing_image": 1}
    for suffix in (".bin", ".idx", ".skipped.jsonl"):
        a = open(tmp_path / f"m{suffix}", "rb").read()
        assert a == open(tmp_path / f"w{suffix}", "rb").read() and len(a) > 0, suffix
    errors = [_preprocess(launcher, raw, str(tmp_path / "e"), str(tmp_path / "missing.jsonl"))
              for launcher in (module, wrapper)]
    assert errors[0].returncode == errors[1].returncode == 2
    assert errors[0].stderr == errors[1].stderr and "missing.jsonl: does not exist" in \
        errors[0].stderr
