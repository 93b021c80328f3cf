"""The atomic-write helper: old file intact on failure, no temporaries left, errno named."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from pagedopt.fileio import (
    TEMP_PREFIX,
    AtomicWriteError,
    atomic_save,
    atomic_write,
    atomic_write_text,
    remove_stale_temporaries,
)


def test_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_exception_in_body_keeps_previous_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_write_text(target, "previous")
    with pytest.raises(KeyError):
        with atomic_write(target) as f:
            f.write(b"partial")
            raise KeyError("boom")
    assert target.read_text() == "previous"
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))


def test_missing_directory_names_path_and_errno(tmp_path):
    target = tmp_path / "nope" / "x.pt"
    with pytest.raises(AtomicWriteError) as info:
        atomic_write_text(target, "x")
    assert info.value.errno == errno.ENOENT
    assert str(target) in str(info.value) and "ENOENT" in str(info.value)


def test_torch_save_round_trip(tmp_path):
    target = tmp_path / "t.pt"
    atomic_save({"w": torch.arange(5)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(5))


def test_file_size_limit_keeps_previous_checkpoint(tmp_path):
    """A write that hits RLIMIT_FSIZE (a stand-in for a full disk) fails cleanly."""
    target = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.zeros(4)}, target)
    before = target.read_bytes()
    script = textwrap.dedent(
        f"""
        import resource, signal, sys, torch
        from pagedopt.fileio import atomic_save, AtomicWriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        try:
            atomic_save({{"w": torch.zeros(1 << 20)}}, {str(target)!r})
        except AtomicWriteError as err:
            print("ERR", err.errno, err)
            sys.exit(3)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert f"ERR {errno.EFBIG}" in proc.stdout and str(target) in proc.stdout
    assert target.read_bytes() == before
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))


def test_kill_during_write_keeps_previous_file(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"previous")
    script = textwrap.dedent(
        f"""
        import os, time
        from pagedopt.fileio import atomic_write
        with atomic_write({str(target)!r}) as f:
            f.write(b"x" * 4096); f.flush()
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert target.read_bytes() == b"previous"
    assert remove_stale_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]
