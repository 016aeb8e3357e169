"""Checkpoint files: generations, untrusted pickles, full disks and kills while writing."""

import errno
import hashlib
import multiprocessing
import os
import pathlib
import random
import shutil
import signal
import time
from collections import namedtuple

import numpy as np
import pytest
import torch

from utils import checkpoints
from utils.checkpoints import (
    CheckpointError,
    CheckpointWriteError,
    UntrustedCheckpointError,
    load_checkpoint,
    load_newest,
    previous_generation,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

Usage = namedtuple("Usage", "total used free")


def state(generation: int, numel: int = 1000) -> dict:
    return {"generation": generation, "weights": torch.full((numel,), float(generation))}


def digest(path):
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_two_generations_and_rng_states_round_trip(tmp_path):
    path = tmp_path / "ckpts" / "latest.pt"
    assert previous_generation(path) == tmp_path / "ckpts" / "latest.prev.pt"
    save_checkpoint({**state(1), "rng": rng_state()}, path)
    # the global NumPy generator is the one a checkpoint restores, hence the legacy calls
    expected = random.random(), float(np.random.rand()), torch.rand(3)  # noqa: NPY002
    save_checkpoint(state(2), path)
    assert load_checkpoint(path)["generation"] == 2
    first = load_checkpoint(previous_generation(path))
    assert first["generation"] == 1
    set_rng_state(first["rng"])  # what weights_only=True gives back restores every generator
    again = random.random(), float(np.random.rand()), torch.rand(3)  # noqa: NPY002
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])
    save_checkpoint(state(3), path)
    assert load_checkpoint(previous_generation(path))["generation"] == 2  # generation 1 is dropped
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest.prev.pt", "latest.pt"]


def test_a_save_clears_what_writers_killed_mid_write_or_mid_rotation_left(tmp_path):
    path = tmp_path / "latest.pt"
    save_checkpoint(state(1), path)
    (tmp_path / ".latest.pt.tmp-101").write_bytes(b"half a checkpoint")  # killed inside torch.save
    os.link(path, tmp_path / ".latest.prev.pt.tmp-102")  # killed between linking and renaming the link
    (tmp_path / ".other.pt.tmp-103").write_bytes(b"")  # another file's writer: not ours to clear
    save_checkpoint(state(2), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.tmp-103", "latest.prev.pt", "latest.pt"]
    assert path.stat().st_nlink == 1 and previous_generation(path).stat().st_nlink == 1  # no old inode held


def test_a_save_after_a_kill_between_rotating_and_renaming_leaves_no_link(tmp_path):
    # Killed after `latest.prev.pt` became a link of `latest.pt`, before the new file was renamed in:
    # the two names are one file, and renaming a link onto it does nothing.
    path = tmp_path / "latest.pt"
    save_checkpoint(state(1), path)
    os.link(path, previous_generation(path))
    save_checkpoint(state(2), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.prev.pt", "latest.pt"]
    assert load_checkpoint(path)["generation"] == 2
    assert load_checkpoint(previous_generation(path))["generation"] == 1


class _TouchesAFile:
    """A pickled object whose loading would create a file (stands for any code a pickle can run)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.target),)


def test_a_checkpoint_holding_an_arbitrary_pickled_object_is_refused_and_never_run(tmp_path):
    path, sentinel = tmp_path / "latest.pt", tmp_path / "ran"
    save_checkpoint(state(1), path)  # a good previous generation must not be used instead
    torch.save({"weights": torch.zeros(2), "payload": _TouchesAFile(sentinel)}, path)
    with pytest.raises(UntrustedCheckpointError, match=r"refusing to load .*latest\.pt: it holds pickled Python "
                       r"objects \(\w+\).*nothing in it was run"):
        load_newest(path)
    assert not sentinel.exists()


def test_truncated_newest_generation_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog):
    path = tmp_path / "latest.pt"
    save_checkpoint(state(1), path)
    save_checkpoint(state(2), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt: PytorchStreamReader failed reading zip archive"):
        load_checkpoint(path)
    ckpt, used = load_newest(path)
    assert (ckpt["generation"], used) == (1, previous_generation(path))
    assert "using the previous generation" in caplog.text and "latest.prev.pt" in caplog.text
    # The next save replaces the unreadable file and keeps the good previous generation.
    save_checkpoint(state(3), path)
    assert load_checkpoint(path)["generation"] == 3
    assert load_checkpoint(previous_generation(path))["generation"] == 1


def test_no_readable_generation_is_a_clear_error(tmp_path):
    path = tmp_path / "latest.pt"
    with pytest.raises(FileNotFoundError, match="train the run first"):
        load_newest(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_newest(path)
    previous_generation(path).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="neither generation of .*latest.pt can be read"):
        load_newest(path)


class FullDisk:
    """A file whose writes fail with ENOSPC once more than `limit` bytes were written (a full disk)."""

    def __init__(self, file, limit: int = 1000):
        self.file, self.written, self.limit = file, 0, limit

    def write(self, data):
        self.written += len(data)
        if self.written > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_enospc_while_writing_keeps_both_generations_and_says_what_was_needed(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint(state(1), path)
    save_checkpoint(state(2), path)
    before = {p.name: digest(p) for p in tmp_path.iterdir()}

    monkeypatch.setattr(checkpoints, "open", lambda p, mode: FullDisk(open(p, mode)), raising=False)
    need = 1000 * 4 + checkpoints.HEADROOM_BYTES
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(state(3), path)
    message = str(info.value)
    assert "No space left on device" in message and f"needs about {need:,} bytes" in message
    assert f"{tmp_path} has " in message and "latest.pt and latest.prev.pt are unchanged" in message
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before  # nothing torn, no temporary file left


def test_short_free_space_refuses_before_writing_and_a_tight_disk_warns_a_save_ahead(tmp_path, monkeypatch, caplog):
    path = tmp_path / "latest.pt"
    save_checkpoint(state(1, numel=1_000_000), path)
    size = path.stat().st_size
    before = digest(path)
    free = {"bytes": 1000}
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: Usage(10**12, 0, free["bytes"]))
    with pytest.raises(CheckpointWriteError, match=rf"not enough disk space to save .*latest.pt: it needs about "
                       rf"{checkpoints.HEADROOM_BYTES + 4_000_000:,} bytes and .* has 1,000 free"):
        save_checkpoint(state(2, numel=1_000_000), path)
    assert digest(path) == before and not previous_generation(path).exists()
    assert list(tmp_path.iterdir()) == [path]  # refused before opening anything
    free["bytes"] = checkpoints.HEADROOM_BYTES + 4_000_000  # room for this save, but less than two checkpoints
    assert free["bytes"] < 2 * size
    save_checkpoint(state(2, numel=1_000_000), path)
    assert load_checkpoint(path)["generation"] == 2
    assert f"only {free['bytes']:,} bytes free" in caplog.text and "make room before the disk fills up" in caplog.text
    caplog.clear()
    free["bytes"] = 2 * size
    save_checkpoint(state(3, numel=1_000_000), path)
    assert "bytes free" not in caplog.text


def _save_forever(path, first_generation, weights):
    """Child process: save generation after generation of a 2 MB checkpoint until killed. The tensor
    comes from the parent: a forked child must not start torch's thread pool (it can hang)."""
    generation = first_generation
    while True:
        generation += 1
        save_checkpoint({"generation": generation, "weights": weights}, path)


def test_kill_9_at_random_moments_while_saving_never_tears_or_loses_the_checkpoint(tmp_path):
    path = tmp_path / "latest.pt"
    weights = torch.randn(500_000, generator=torch.Generator().manual_seed(0))
    save_checkpoint({"generation": 0, "weights": weights}, path)
    rng = random.Random(17)
    context = multiprocessing.get_context("fork")  # a child that is ready to write within milliseconds
    newest, torn_writes = 0, 0
    for _ in range(8):
        child = context.Process(target=_save_forever, args=(path, newest, weights))
        child.start()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        torn_writes += any(tmp_path.glob(".latest.pt.tmp-*"))  # killed inside a write
        latest = load_checkpoint(path)  # the newest generation itself, complete, no fallback
        assert torch.equal(latest["weights"], weights)
        assert latest["generation"] >= newest
        if previous_generation(path).exists():
            previous = load_checkpoint(previous_generation(path))
            assert torch.equal(previous["weights"], weights) and previous["generation"] <= latest["generation"]
        newest = latest["generation"]
    assert newest > 0 and torn_writes > 0  # the children did write, and kills did land inside writes
    save_checkpoint({"generation": newest + 1, "weights": weights}, path)  # clears what killed writers left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.prev.pt", "latest.pt"]
