"""Checkpoint files: two generations, written so that a kill or a full disk never costs the last good one.

A checkpoint is a plain dict of tensors, numbers, strings and containers of them (state dicts, RNG
states as tensors): `torch.load(weights_only=True)` reads it, and a file that needs anything more
(arbitrary pickled objects, which could run code) is refused, never executed.

Generations: `<stem>.pt` is the newest, `<stem>.prev.pt` the one before. `save_checkpoint`
1. checks the free space against the size the file will have (the larger of the previous file of that
   name and the tensors to write) and refuses at once, with both numbers, when it is short;
2. writes a temporary file in the same folder, flushes it to disk and reads it back (structure and
   pickle through a memory map, so it costs little even for a large file);
3. only then makes the newest generation the previous one (a hard link renamed over `.prev.pt`) and
   renames the temporary file over `<stem>.pt`.
`<stem>.pt` is a complete file at every moment; a failed write leaves both generations as they were
and raises `CheckpointWriteError` saying how many bytes were needed and where. A save that leaves less
than two checkpoints' size free warns, while the next save still fits. `load_newest` falls back to the previous
generation, with a warning, when the newest is missing or unreadable (truncated, corrupt).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from utils.cli import RunError, one_line

log = logging.getLogger("magic_mirror")

HEADROOM_BYTES = 1 << 20
"""Allowance for the zip and pickle records around the tensor bytes of a checkpoint."""


class CheckpointError(RunError):
    """A checkpoint that cannot be read or written."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint holding pickled objects beyond what `torch.load(weights_only=True)` reads."""


class CheckpointWriteError(CheckpointError):
    """A save that failed (disk full, write error); both generations on disk are unchanged."""


def previous_generation(path: Path) -> Path:
    """`ckpts/latest.pt` -> `ckpts/latest.prev.pt`: where the generation before `path` is kept."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def tensor_bytes(obj) -> int:
    """Bytes of all tensors in a nested dict / list / tuple (a lower bound of its checkpoint's size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class _Sink:
    """File wrapper for torch.save that keeps the OSError of a failed write (torch replaces it by an
    'unexpected pos' RuntimeError that does not say the disk is full)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _readable(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any failure to read back means the file is not a usable generation
        return False
    return True


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (they live in the directory, not in the files)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path: Path) -> int:
    """Write `state` as the newest generation of `path`, keeping the newest so far as `.prev`.

    Args:
        state: dict of tensors, numbers, strings, None and lists / tuples / dicts of them.
        path: the checkpoint file, e.g. `log/<run>/ckpts/latest.pt`.
    Returns the size of the written file in bytes.
    Raises CheckpointWriteError when the free space is short or the write fails; then `path` and its
    previous generation are unchanged.
    """
    path = Path(path)
    folder, prev = path.parent, previous_generation(path)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (path.name, prev.name):  # left by a process killed while writing or linking; a stale
        for stale in folder.glob(f".{name}.tmp-*"):  # link would keep an old checkpoint's disk space in use
            stale.unlink(missing_ok=True)
    need = max(tensor_bytes(state) + HEADROOM_BYTES, path.stat().st_size if path.is_file() else 0)
    kept = f"{path} and {prev.name} are unchanged" if prev.is_file() else f"{path} is unchanged"
    free = _free_bytes(folder)
    if free < need:
        raise CheckpointWriteError(
            f"not enough disk space to save {path}: it needs about {need:,} bytes and {folder} has {free:,} "
            f"free; {kept}. Free some space, then run the same command with --resume")
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    sink = None
    try:
        with open(tmp, "wb") as f:
            sink = _Sink(f)
            torch.save(state, sink)
            f.flush()
            os.fsync(f.fileno())
        if not _readable(tmp):
            raise OSError(f"the written file {tmp} does not read back")
        if _readable(path):  # an unreadable newest generation must not push out the good previous one
            link = folder / f".{prev.name}.tmp-{os.getpid()}"
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)
                os.replace(link, prev)
                # A rename onto a hard link of the same file does nothing (POSIX), leaving `link`: the case
                # when a writer was killed after rotating but before renaming its new file into place.
                link.unlink(missing_ok=True)
            except OSError:  # no hard links on this file system: for a moment only .prev exists
                link.unlink(missing_ok=True)
                os.replace(path, prev)
        os.replace(tmp, path)
        _fsync_dir(folder)
    except (OSError, RuntimeError) as err:
        cause = sink.error if sink is not None and sink.error is not None else err
        raise CheckpointWriteError(
            f"could not write {path} ({one_line(cause)}): it needs about {need:,} bytes and "
            f"{folder} has {_free_bytes(folder):,} free now; {kept}. Free some space, then run the same "
            "command with --resume") from err
    finally:
        tmp.unlink(missing_ok=True)
    size = path.stat().st_size
    free = _free_bytes(folder)
    if free < 2 * size:  # a save needs one checkpoint's size free: warn while one more is still spare
        log.warning("only %s bytes free in %s after writing %s (%s bytes); each save needs about that much "
                    "free: make room before the disk fills up", f"{free:,}", folder, path, f"{size:,}")
    return size


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Read one checkpoint file with `torch.load(weights_only=True)`.

    Raises FileNotFoundError if it is missing, UntrustedCheckpointError if it needs more than tensors,
    numbers and containers (nothing in it is run), CheckpointError if it is truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found: train the run first, or check --name and the ckpts/ folder")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise CheckpointError(f"checkpoint {path} is unreadable (corrupt: not a pickle of tensors)") from err
        raise UntrustedCheckpointError(
            f"refusing to load {path}: it holds pickled Python objects ({found[1]}) beyond tensors, numbers "
            "and containers, which could run code when read; nothing in it was run. Only checkpoints written "
            "by this project are read") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        # torch's zip reader appends a paragraph of advice to its first sentence: keep the sentence
        reason = one_line(err).split(". ")[0]
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt: {reason})") from err


def load_newest(path: Path, map_location="cpu") -> tuple[dict, Path]:
    """Read the newest readable generation of `path`: `path` itself, else (warning) `<stem>.prev.pt`.

    Returns (the checkpoint dict, the file it came from). Raises as `load_checkpoint` when neither
    generation can be read; an untrusted newest file is refused, not skipped.
    """
    path, prev = Path(path), previous_generation(path)
    try:
        return load_checkpoint(path, map_location), path
    except UntrustedCheckpointError:
        raise
    except (FileNotFoundError, CheckpointError) as err:
        if not prev.is_file():
            raise
        log.warning("%s; using the previous generation %s", one_line(err), prev)
        try:
            return load_checkpoint(prev, map_location), prev
        except CheckpointError as prev_err:
            raise CheckpointError(f"neither generation of {path} can be read: {err}; {prev_err}") from prev_err


def rng_state() -> dict:
    """The state of every random generator a training step draws from, in types weights_only reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    # A checkpoint read with map_location="cuda" moved these byte tensors; generators take CPU ones.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
