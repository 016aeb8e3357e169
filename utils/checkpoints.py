"""Checkpoint files: written atomically, holding everything `--resume` needs.

A checkpoint is a plain dict of tensors, numbers and state dicts (no pickled code), saved with
`torch.save` to a temporary file in the same folder, flushed to disk, then renamed over the target,
so an interruption at any moment leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def save_checkpoint(state: dict, path: Path) -> None:
    """Atomically write `state` to `path` (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`; a clear error if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found: train the run first, or check --name and the ckpts/ folder"
        )
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_state() -> dict:
    """The state of every random generator a training step draws from."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
