"""Every user-facing script: `--help` prints its usage; expected failures end in one line on stderr and exit
status 2 (`--debug` shows the traceback); bugs keep their traceback."""

import runpy
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest

import train
from utils.cli import EXIT_EXPECTED, EXIT_INTERRUPTED, RunError, run_main

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
    assert "--debug" in result.stdout


def run_script(script, monkeypatch, *args):
    """Run a script as its command line does (`python script args`), in this process; its exit status."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *map(str, args)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return info.value.code


def error_lines(capsys):
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_flag_is_one_line_on_stderr_and_exit_status_2(script, monkeypatch, capsys):
    assert run_script(script, monkeypatch, "--no-such-flag") == EXIT_EXPECTED
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and lines[0].endswith("(see --help)")


def test_a_missing_run_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    args = ["--name", "nope", "--log_root", tmp_path, "--device", "cpu"]
    assert run_script("test.py", monkeypatch, *args) == EXIT_EXPECTED
    assert error_lines(capsys) == [f"test.py: error: run folder {tmp_path / 'nope'} not found: check --name "
                                   "(runs live in log/<name>)"]
    monkeypatch.setattr(sys, "argv", ["test.py", *map(str, args), "--debug"])
    with pytest.raises(FileNotFoundError, match="check --name"):
        runpy.run_path(str(ROOT / "test.py"), run_name="__main__")


def test_run_main_sorts_expected_failures_from_bugs(capsys):
    def failing(error):
        def main(argv):
            raise error
        return main

    for error in (RunError("disk\nfull"), FileNotFoundError("no such file"), ValueError("bad value"),
                  ImportError("pip install it")):
        assert run_main(failing(error), []) == EXIT_EXPECTED
        lines = error_lines(capsys)
        assert len(lines) == 1 and lines[0].startswith("test_scripts.py: error: "), lines
    assert error_lines(capsys) == []
    assert run_main(failing(RunError("disk\n  full")), []) == EXIT_EXPECTED
    assert error_lines(capsys) == ["test_scripts.py: error: disk full"]
    with pytest.raises(KeyError):  # a bug: traceback
        run_main(failing(KeyError("x")), [])
    with pytest.raises(RunError):
        run_main(failing(RunError("x")), ["--debug"])
    assert run_main(failing(RunError("x")), ["--debug", "--no-debug"]) == EXIT_EXPECTED
    assert run_main(failing(KeyboardInterrupt()), []) == EXIT_INTERRUPTED
    assert run_main(lambda argv: 0, []) == 0


TINY = ["--dataset", "synthetic", "--imageSize", "64", "--batchSize", "4", "--synthetic_train", "8",
        "--synthetic_test", "4", "--workers", "0", "--device", "cpu", "--pretraint", "none"]


def test_missing_imagenet_weights_and_missing_data_are_one_line(tmp_path, monkeypatch, capsys):
    import torchvision.models._api

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    args = [*TINY, "--log_root", str(tmp_path), "--name", "weights", "--pretrainc", "res18"]
    assert run_main(train.main, args) == EXIT_EXPECTED
    assert error_lines(capsys) == [
        "train.py: error: could not load ImageNet weights for torchvision res18 (URLError: <urlopen error no "
        "network>); pass --no-pretrained to train the backbone from scratch, or pick the backbone 'none'"]

    args = ["--log_root", str(tmp_path), "--name", "data", "--dataroot", str(tmp_path / "missing"),
            "--pretrains", "none", "--pretraint", "none", "--device", "cpu", "--workers", "0"]
    assert run_main(train.main, args) == EXIT_EXPECTED
    lines = error_lines(capsys)
    assert len(lines) == 1 and str(tmp_path / "missing") in lines[0] and "prepare_cub.py" in lines[0]
