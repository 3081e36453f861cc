"""One writer per output (an OS lock that dies with its holder) and durable saves: every file
of a checkpoint, a dataset and an export is flushed to stable storage before the rename that
makes it visible."""

import contextlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from eve_megatron.outputs import OutputBusyError, OutputLock

HOLD = ("import sys, time; sys.path.insert(0, {root!r}); from eve_megatron.outputs import OutputLock;"
        " OutputLock({path!r}, 'test output').acquire(); print('held', flush=True); time.sleep(60)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    path = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, path=path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match=f"pid {holder.pid} on"):
            OutputLock(path, "test output").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with OutputLock(path, "test output"):  # the kernel released the dead holder's lock
        assert os.path.exists(path + ".lock")
        with pytest.raises(OutputBusyError):
            OutputLock(path).acquire()  # the same process opening it again is refused too
    assert not os.path.exists(path + ".lock")


@contextlib.contextmanager
def _durability_spy():
    """Record the inode of every fsync'd file or folder; check at each rename that the
    renamed file, or every file and folder inside a renamed folder, was flushed."""
    synced, real_fsync, real_replace, renames = set(), os.fsync, os.replace, []

    def fsync(fd):
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        return real_fsync(fd)

    def key(path):
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def replace(src, dst):
        paths = [src] if os.path.isfile(src) else [
            os.path.join(d, n) for d, _, files in os.walk(src) for n in files] + [
            d for d, _, _ in os.walk(src)]
        missing = [p for p in paths if key(p) not in synced]
        renames.append((src, missing))
        return real_replace(src, dst)

    os.fsync, os.replace = fsync, replace
    try:
        yield renames
    finally:
        os.fsync, os.replace = real_fsync, real_replace


def test_checkpoint_dataset_and_export_are_flushed_before_they_appear(megatron_world, tmp_path):
    from eve_megatron.data.indexed import IndexedDatasetWriter
    from eve_megatron.hf.export import export_checkpoint
    from eve_megatron.models.eve import EVEModel, eve_config
    from eve_megatron.training import checkpointing

    model = EVEModel(eve_config("tiny"))
    with _durability_spy() as renames:
        checkpointing.save_checkpoint(str(tmp_path / "ckpt"), 1, [model])
        writer = IndexedDatasetWriter(str(tmp_path / "ds"), {"x": 1})
        writer.add(np.arange(1, 9), np.ones(8, dtype=np.int64))
        writer.finalize()
        export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
    names = [os.path.basename(src) for src, _ in renames]
    assert {"iter_0000001.tmp", "latest_checkpointed_iteration.txt.tmp", "ds.bin.tmp",
            "ds.idx.tmp", "hf.tmp"} <= set(names), names
    for src, missing in renames:
        assert not missing, f"{src}: not flushed before the rename: {missing[:3]}"


def test_busy_outputs_are_refused_by_export_and_import(megatron_world, tmp_path):
    from eve_megatron.hf.export import export_checkpoint
    from eve_megatron.hf.importer import import_hf
    from eve_megatron.models.eve import EVEModel, eve_config
    from eve_megatron.training import checkpointing

    checkpointing.save_checkpoint(str(tmp_path / "ckpt"), 1, [EVEModel(eve_config("tiny"))])
    with OutputLock(str(tmp_path / "hf"), "export folder"):
        with pytest.raises(OutputBusyError, match="export folder .* is being written"):
            export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"), progress=False)
        with pytest.raises(OutputBusyError, match="being written"):
            import_hf(str(tmp_path / "nowhere"), str(tmp_path / "hf"), progress=False)
    assert not os.path.exists(tmp_path / "hf")


def test_tool_errors_name_the_file_and_reason(tmp_path):
    """A missing input names its path (not a bare errno); a bad size is refused up front."""
    for argv, words in (
            (["tools/checkpoint/import_hf.py", "--hf", str(tmp_path / "missing"), "--save",
              str(tmp_path / "out")], str(tmp_path / "missing")),
            (["tools/checkpoint/export_hf.py", "--load", str(tmp_path / "missing"), "--save",
              str(tmp_path / "hf")], str(tmp_path / "missing")),
            (["tools/checkpoint/export_hf.py", "--load", str(tmp_path), "--save",
              str(tmp_path / "hf"), "--max-shard-size", "-1"], "--max-shard-size must be positive"),
            (["tools/generate.py", "--model", str(tmp_path / "missing"), "--prompt", "hi"],
             "not an exported model folder")):
        out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 2 and words in out.stderr, (argv, out.stderr[-1000:])
        assert "error: 2" not in out.stderr and "Traceback" not in out.stderr
