"""Every user-facing script runs `--help` and prints its usage."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "train.py", "train_market.py", "train_ATR2.py", "test.py", "show_rainbow2.py", "demo.py",
    "prepare_cub.py", "prepare_market.py", "prepare_ATR.py", "download_models.py",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
