"""End-to-end training on a tiny synthetic dataset: smoke runs, resume, interruption, NaN handling."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
import train_ATR2
import train_market
from networks import losses
from utils.checkpoints import load_checkpoint
from utils.cli import EXIT_EXPECTED, run_main
from utils.model import build_template
from utils.options import parse_options
from utils.trainer import NonFiniteLossError, Trainer, run_log
from utils.trainer import train as run_training

ROOT = Path(__file__).resolve().parents[1]
# By path: `import test` could find the standard library's `test` package instead.
_spec = importlib.util.spec_from_file_location("evaluation_script", ROOT / "test.py")
test_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_script)

# 8 training images at batch 4: two steps per epoch.
TINY = ["--dataset", "synthetic", "--imageSize", "64", "--batchSize", "4", "--synthetic_train", "8",
        "--synthetic_test", "4", "--workers", "0", "--device", "cpu", "--eval_every", "100", "--vis_every", "100"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def tiny_args(tmp_path, data_root, name, *extra):
    return [*TINY, "--dataroot", data_root, "--log_root", str(tmp_path), "--name", name, *extra]


@pytest.mark.parametrize("script", [train, train_market, train_ATR2])
def test_each_training_script_runs_two_iterations(script, tmp_path, data_root):
    ratio_flags = ["--ratio", "1"]  # the synthetic cache is shared by the three runs of this module
    args = tiny_args(tmp_path, data_root, "smoke", "--niter", "1", "--hard", "--vis_every", "1", *ratio_flags)
    assert script.main(args) == 0
    run = tmp_path / "smoke"
    ckpt = load_checkpoint(run / "ckpts" / "latest.pt")
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2
    for name in ("opts.yaml", "log.txt", "metrics.jsonl", "ckpts/best.pt", "ckpts/latest_template.obj"):
        assert (run / name).is_file(), name
    best = load_checkpoint(run / "ckpts" / "best.pt")  # for evaluation: weights and template, no training state
    assert {"encoder", "swa_encoder", "template", "epoch"} <= set(best) and not {"opt_encoder", "rng"} & set(best)
    assert (run / "ckpts" / "best.pt").stat().st_size < (run / "ckpts" / "latest.pt").stat().st_size / 2
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= metrics["mask_iou"] <= 1.0 and 0.0 < metrics["chamfer_template"]
    assert any((run / "visuals").glob("epoch_000_rotation.gif"))


def _params(trainer):
    state = {f"encoder.{k}": v.clone() for k, v in trainer.encoder.state_dict().items()}
    state.update({f"critic.{k}": v.clone() for k, v in trainer.critic.state_dict().items()})
    state["template"] = trainer.template.verts.clone()
    return state


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path, data_root):
    # 3 epochs x 2 steps, the template updated every epoch, SWA from epoch 1.
    extra = ["--niter", "3", "--em", "7", "--swa_start", "1", "--update_shape", "-1"]
    straight = run_training(parse_options(tiny_args(tmp_path, data_root, "straight", *extra), {}))

    def interrupt_at_step_3(trainer):
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = run_training(parse_options(tiny_args(tmp_path, data_root, "resumed", *extra), {}), interrupt_at_step_3)
    assert stopped.global_step == 3 and stopped.epoch == 1  # stopped mid-epoch 1
    ckpt = load_checkpoint(tmp_path / "resumed" / "ckpts" / "latest.pt")
    assert (ckpt["epoch"], ckpt["next_batch"]) == (1, 1)
    resumed = run_training(parse_options(tiny_args(tmp_path, data_root, "resumed", *extra, "--resume"), {}))
    assert resumed.global_step == 6
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    initial = build_template(straight.opts).verts
    assert not torch.allclose(straight.template.verts, initial)  # the EM step ran


def test_reusing_a_run_name_needs_resume(tmp_path, data_root):
    args = tiny_args(tmp_path, data_root, "taken", "--niter", "1")
    run_training(parse_options(args, {}))
    with pytest.raises(FileExistsError, match="--resume"):
        run_training(parse_options(args, {}))
    with pytest.raises(FileNotFoundError, match="without --resume"):
        run_training(parse_options(tiny_args(tmp_path, data_root, "never-ran", "--resume"), {}))


@pytest.mark.parametrize("flag, expected", [((), True), (("--no-cudnn_benchmark",), False)])
def test_cudnn_benchmark_flag_sets_the_backend_both_ways(tmp_path, data_root, monkeypatch, flag, expected):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not expected)  # restored after the test
    Trainer(parse_options(tiny_args(tmp_path, data_root, "cudnn", *flag), {}))
    assert torch.backends.cudnn.benchmark is expected


def test_azimuth_spread_prior_reads_each_steps_predicted_azimuths_only_when_asked(tmp_path, data_root, monkeypatch):
    seen = []
    real = losses.azimuth_spread_loss

    def spy(azimuth_deg, *args):
        seen.append((tuple(azimuth_deg.shape), azimuth_deg.requires_grad))
        return real(azimuth_deg, *args)

    monkeypatch.setattr(losses, "azimuth_spread_loss", spy)
    run_training(parse_options(tiny_args(tmp_path, data_root, "off", "--niter", "1"), {}))
    assert seen == []
    flags = ("--niter", "1", "--lambda_spread", "2")
    run_training(parse_options(tiny_args(tmp_path, data_root, "on", *flags, "--update_shape", "0"), {}))
    assert seen == [((4,), True)] * 2  # two steps of batch 4, gradients reach the camera encoder
    seen.clear()  # the default schedule (--update_shape 1) freezes the camera in every step: no gradient
    run_training(parse_options(tiny_args(tmp_path, data_root, "frozen", *flags), {}))
    assert seen == [((4,), False)] * 2


def test_non_finite_losses_skip_steps_then_stop_without_a_bad_checkpoint(tmp_path, data_root, monkeypatch, caplog):
    real = losses.data_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        image, mask = real(*args, **kwargs)
        return (image * float("nan"), mask) if calls["n"] >= 2 else (image, mask)

    monkeypatch.setattr(losses, "data_loss", sometimes_nan)
    args = tiny_args(tmp_path, data_root, "nan", "--niter", "4", "--max_bad_steps", "3")
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        run_training(parse_options(args, {}))
    assert "step skipped" in caplog.text
    ckpt = load_checkpoint(tmp_path / "nan" / "ckpts" / "latest.pt")  # written after epoch 0
    assert all(v.isfinite().all() for v in ckpt["encoder"].values() if v.is_floating_point())


def test_sigterm_to_the_process_group_with_loader_workers_saves_a_resumable_checkpoint(tmp_path, data_root):
    # `timeout`, schedulers and a terminal's Ctrl-C signal the whole process group, loader workers too.
    args = tiny_args(tmp_path, data_root, "group", "--niter", "50", "--workers", "2")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "group" / "ckpts" / "latest.pt"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert latest.exists(), "no checkpoint after the first epoch"
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert "continue with --resume" in stderr, stderr[-3000:]
    ckpt = load_checkpoint(latest)
    assert ckpt["epoch"] < 50 and ckpt["global_step"] >= 2


# ----------------------------------------------------------------------------- surviving kills, full disks, requeues


class HardKill(BaseException):
    """Stands for kill -9: it ends the run without the trainer's signal handling saving anything."""


def kill_at(step):
    def on_step(trainer):
        if trainer.global_step == step:
            raise HardKill

    return on_step


def attempt(args, on_step=None):
    """Run one attempt of a training command; a HardKill ends it the way kill -9 would."""
    try:
        return run_training(parse_options(args, {}), on_step)
    except HardKill:
        return None


def assert_same_weights(a, b):
    a, b = _params(a), _params(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root):
    """The uninterrupted 3-epoch run (2 steps each) the interrupted ones below must reproduce exactly."""
    return run_training(parse_options(tiny_args(tmp_path_factory.mktemp("straight"), data_root, "straight",
                                                "--niter", "3"), {}))


def test_requeued_command_starts_a_run_killed_before_its_first_checkpoint_then_resumes_it(tmp_path, data_root,
                                                                                           straight):
    args = tiny_args(tmp_path, data_root, "requeued", "--niter", "3", "--auto_resume")
    run = tmp_path / "requeued"
    assert attempt(args, kill_at(1)) is None  # killed in epoch 0: opts.yaml, no checkpoint
    assert (run / "opts.yaml").is_file() and not any((run / "ckpts").glob("*.pt"))
    assert attempt(args, kill_at(3)) is None  # the same command starts it again; killed after epoch 0's save
    assert load_checkpoint(run / "ckpts" / "latest.pt")["global_step"] == 2
    finished = attempt(args)  # and resumes it
    assert finished.global_step == 6
    assert_same_weights(finished, straight)
    log_text = (run / "log.txt").read_text()
    assert "holds no checkpoint yet" in log_text and "resumed from" in log_text

    with pytest.raises(ValueError, match=r"started with other options: --lr 0.0001 \(now 0.0002\)"):
        run_training(parse_options([*args, "--lr", "2e-4"], {}))
    with pytest.raises(FileExistsError, match="--auto_resume"):  # without it, a checkpoint is never overwritten
        run_training(parse_options(tiny_args(tmp_path, data_root, "requeued", "--niter", "3"), {}))


def test_plain_command_restarts_a_run_killed_before_its_first_checkpoint(tmp_path, data_root):
    args = tiny_args(tmp_path, data_root, "plain", "--niter", "1")
    assert attempt(args, kill_at(1)) is None
    assert attempt(args).global_step == 2


def test_truncated_latest_resumes_bit_exact_from_the_previous_generation_and_test_py_uses_it(
        tmp_path, data_root, straight, capsys, caplog):
    args = tiny_args(tmp_path, data_root, "truncated", "--niter", "3")
    assert attempt(args, kill_at(5)) is None  # latest.pt after epoch 1 (step 4), latest.prev.pt after epoch 0
    latest = tmp_path / "truncated" / "ckpts" / "latest.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 3])

    evaluation = ["--name", "truncated", "--log_root", str(tmp_path), "--checkpoint", "latest", "--device", "cpu"]
    assert test_script.main(evaluation) == 0
    assert "using the previous generation" in caplog.text and "latest.prev.pt" in caplog.text
    line = json.loads((tmp_path / "truncated" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["checkpoint"].endswith("latest.prev.pt") and line["epoch"] == 1
    capsys.readouterr()

    resumed = attempt([*args, "--resume"])
    assert resumed.global_step == 6
    assert_same_weights(resumed, straight)


def test_timed_checkpoints_inside_an_epoch_resume_exactly_and_zero_turns_them_off(tmp_path, data_root, straight):
    # 1e-6 minutes: a checkpoint after every step that does not end an epoch.
    args = tiny_args(tmp_path, data_root, "timed", "--niter", "3", "--save_every_min", "1e-6")
    assert attempt(args, kill_at(4)) is None  # killed after step 4's update, before its checkpoint
    ckpt = load_checkpoint(tmp_path / "timed" / "ckpts" / "latest.pt")
    assert (ckpt["epoch"], ckpt["next_batch"], ckpt["global_step"]) == (1, 1, 3)
    resumed = attempt([*args, "--resume"])
    assert resumed.global_step == 6
    assert_same_weights(resumed, straight)

    off = tiny_args(tmp_path, data_root, "untimed", "--niter", "3", "--save_every_min", "0")
    assert attempt(off, kill_at(2)) is None  # after epoch 0's last step, before its checkpoint
    assert not (tmp_path / "untimed" / "ckpts" / "latest.pt").exists()


def test_disk_full_at_a_save_keeps_the_last_checkpoint_exits_2_and_the_next_start_resumes(
        tmp_path, data_root, straight, monkeypatch, capsys):
    args = tiny_args(tmp_path, data_root, "full", "--niter", "3")
    latest = tmp_path / "full" / "ckpts" / "latest.pt"
    real_usage = shutil.disk_usage

    def fills_after_the_first_checkpoint(folder):
        usage = real_usage(folder)
        return usage._replace(free=1000) if latest.exists() else usage

    monkeypatch.setattr(shutil, "disk_usage", fills_after_the_first_checkpoint)
    assert run_main(train.main, args) == EXIT_EXPECTED
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("train.py: error: not enough disk space to save ") and "needs about" in error
    assert "has 1,000 free" in error and "Traceback" not in error
    assert load_checkpoint(latest)["global_step"] == 2  # epoch 0's checkpoint is kept
    assert not any(latest.parent.glob(".*tmp*"))

    monkeypatch.setattr(shutil, "disk_usage", real_usage)  # space freed
    resumed = attempt([*args, "--resume"])
    assert resumed.global_step == 6
    assert_same_weights(resumed, straight)


def test_loader_skips_are_written_to_the_runs_log(tmp_path):
    data = tmp_path / "data"
    args = [*TINY, "--dataroot", str(data), "--log_root", str(tmp_path)]
    Trainer(parse_options([*args, "--name", "first"], {}))  # generates the synthetic data
    stray = data / "train" / "000" / "stray.png"  # an image without its mask
    Image.new("RGB", (64, 64)).save(stray)
    with run_log(tmp_path / "skips", enabled=True):  # what train() wraps a run in
        Trainer(parse_options([*args, "--name", "skips"], {}))
    log_text = (tmp_path / "skips" / "log.txt").read_text()
    assert f"skipped 1 file(s): image without a mask ({stray})" in log_text
    assert "data: 8 train, 8 clean, 4 test images" in log_text
