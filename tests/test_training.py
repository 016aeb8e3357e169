"""End-to-end training on a tiny synthetic dataset: smoke runs, resume, interruption, NaN handling."""

import importlib.util
import json
import math
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
from test_checkpoints import FullDisk

import train
import train_ATR2
import train_market
from networks import losses
from utils import checkpoints
from utils.checkpoints import load_checkpoint
from utils.cli import EXIT_EXPECTED, RunError, run_main
from utils.model import build_template
from utils.options import parse_options
from utils.trainer import NonFiniteLossError, Trainer, run_lock, run_log
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


def test_birds_training_generates_its_data_and_evaluates_against_the_ground_truth(tmp_path):
    data = tmp_path / "birds"
    args = ["--dataset", "birds", "--imageSize", "64", "--batchSize", "4", "--synthetic_train", "4",
            "--synthetic_test", "2", "--workers", "0", "--device", "cpu", "--vis_every", "100", "--niter", "1",
            "--birds_spp", "2", "--dataroot", str(data), "--log_root", str(tmp_path), "--name", "birds"]
    assert train.main(args) == 0
    assert json.loads((data / "manifest.json").read_text())["spp"] == 2
    metrics = json.loads((tmp_path / "birds" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["chamfer_template"] > 0.0 and 0.0 <= metrics["azimuth_err_deg"] <= 180.0


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


def test_a_second_job_on_a_run_being_trained_stops_at_once_and_the_run_is_free_afterwards(tmp_path, data_root):
    args = tiny_args(tmp_path, data_root, "busy", "--niter", "2", "--auto_resume")
    refused = []

    def start_again(trainer):  # a job script submitted twice: the second starts while the first trains
        if not refused:
            with pytest.raises(RunError, match=f"being trained by another job \\(process {os.getpid()} on "):
                run_training(parse_options(args, {}))
            refused.append(trainer.global_step)

    first = run_training(parse_options(args, {}), on_step=start_again)
    assert refused == [1] and first.global_step == 4  # the first job went on undisturbed
    again = run_training(parse_options([*args[:-3], "--niter", "3", "--auto_resume"], {}))
    assert again.global_step == 6  # resumed at epoch 2 once the first job had ended


def test_a_killed_job_leaves_its_run_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from utils.trainer import run_lock\n"
         "with run_lock(Path(sys.argv[1]), True):\n    print('held', flush=True); time.sleep(60)",
         str(tmp_path / "run")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunError, match=f"process {holder.pid} on "), run_lock(tmp_path / "run", True):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path / "run", True):
        pass


@pytest.mark.parametrize("flag, expected", [((), "highest"), (("--tf32",), "high")])
def test_tf32_flag_sets_the_matmul_precision_both_ways(tmp_path, data_root, flag, expected):
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # neither value: the trainer must set it
        Trainer(parse_options(tiny_args(tmp_path, data_root, "tf32", *flag), {}))
        assert torch.get_float32_matmul_precision() == expected
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("flag, expected", [((), True), (("--no-cudnn_benchmark",), False)])
def test_cudnn_benchmark_flag_sets_the_backend_both_ways(tmp_path, data_root, monkeypatch, flag, expected):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not expected)  # restored after the test
    Trainer(parse_options(tiny_args(tmp_path, data_root, "cudnn", *flag), {}))
    assert torch.backends.cudnn.benchmark is expected


def test_a_trainer_is_freed_with_its_last_reference(tmp_path, data_root, freed_at_once):
    # Held in a reference cycle, a trainer outlives its last reference, and so do its loaders'
    # persistent worker processes, which Python then waits for forever when the process exits
    # (tests/test_cuda_paths.py checks the same with the step's CUDA graphs).
    trainer = Trainer(parse_options(tiny_args(tmp_path, data_root, "freed", "--workers", "1"), {}))
    trainer._step(next(iter(trainer.train_loader))["images"], 0)
    box = [trainer]
    del trainer
    assert freed_at_once(box)


def test_the_cuda_speed_paths_stay_off_on_the_cpu(tmp_path, data_root):
    # On by default for a CUDA device only (tests/test_cuda_paths.py); on the CPU PyTorch's own layout.
    trainer = Trainer(parse_options(tiny_args(tmp_path, data_root, "layout_default", "--concurrent_encoders"), {}))
    assert trainer.channels_last is False and trainer.opts.cuda_graphs and trainer._graphs is None
    assert trainer.encoder.concurrent  # asked for; CPU inputs run one after the other all the same:
    assert trainer._step(next(iter(trainer.train_loader))["images"], 0)  # no CUDA stream is touched
    assert next(trainer.encoder.parameters()).device.type == "cpu"


@pytest.mark.parametrize("flags, slow_factor", [((), 0.05), (("--lr_shape_backbone", "0.2"), 0.2),
                                                 (("--lr_shape_backbone", "1"), None)])
def test_shape_backbone_learning_rate_group(tmp_path, data_root, flags, slow_factor):
    trainer = Trainer(parse_options(tiny_args(tmp_path, data_root, "groups", "--lr", "3e-4", *flags), {}))
    groups = trainer.opt_e.param_groups
    backbone = {id(p) for p in trainer.encoder.shape_encoder.backbone.parameters()}
    assert groups[0]["lr"] == pytest.approx(3e-4)
    assert sum(len(g["params"]) for g in groups) == len(list(trainer.encoder.parameters()))
    if slow_factor is None:  # one rate for every parameter
        assert len(groups) == 1
    else:  # from scratch too (the synthetic preset's backbones are 'none'), as the original
        assert len(groups) == 2 and {id(p) for p in groups[1]["params"]} == backbone
        assert groups[1]["lr"] == pytest.approx(slow_factor * 3e-4)
        assert not backbone & {id(p) for p in groups[0]["params"]}


@pytest.mark.parametrize("flags, expected", [((), True), (("--no-original_crop",), False)])
def test_training_loader_gets_the_crop_style(tmp_path, data_root, flags, expected):
    trainer = Trainer(parse_options(tiny_args(tmp_path, data_root, "crop", *flags), {}))
    assert trainer.train_loader.dataset.dataset.original_crop is expected


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


# What each of the first two steps printed before the speed work (issue 15: fused Adam, one render
# call, no host synchronisations), recorded with the code of commit 0155d80 on the CPU: the default
# fp32 path must keep giving these losses for this seed.
RECORDED_STEPS = [
    {"D/adv": 3.673291115724453e-10, "D/gp": 0.0009999703615903854, "E/gan": 7.851776118172893e-09,
     "E/data": 0.5817921161651611, "E/laplacian": 1.0990554528689245e-06, "E/flat": 7.172724508563988e-06,
     "E/edge": 9.099179442273453e-05, "E/deform": 3.4886281355284154e-05, "E/depthC": 0.00216890056617558,
     "E/flip": 2.3566210074932314e-05, "E/cycle": 1.5642210245132446, "D/total": 0.000999970710836351,
     "E/total": 2.1483397483825684, "mask_iou": 0.425508975982666},
    {"D/adv": 8.863400680070299e-09, "D/gp": 0.0009996090084314346, "E/gan": 1.6724200690987345e-08,
     "E/data": 0.7030271291732788, "E/laplacian": 0.0018760132370516658, "E/flat": 0.000569959229324013,
     "E/edge": 0.00011116966197732836, "E/deform": 0.0022395483683794737, "E/depthC": 0.002090468304231763,
     "E/flip": 0.0011693418491631746, "E/cycle": 1.5544227361679077, "D/total": 0.0009996178559958935,
     "E/total": 2.2655062675476074, "mask_iou": 0.30351245403289795},
]


def _first_steps(tmp_path, data_root, *flags):
    flags = ["--hard", "--bg", "--unmask", "2", "--update_shape", "-1", "--L1", "--ganw", "0",
             "--lambda_contour", "0.1", "--lambda_depthC", "0.1", "--warm_epoch", "0",
             "--lr_shape_backbone", "1", "--no-original_crop", "--texture_scratch_blocks", "1,1,1,1",
             *flags]  # the recorded code's behaviour
    trainer = Trainer(parse_options(tiny_args(tmp_path, data_root, "parity", *flags), {}))
    trainer.train_sampler.set_epoch(0, 0)
    batches = [b["images"] for b in trainer.train_loader]
    return [{k: float(v) for k, v in trainer._step(batches[i], i).items()} for i in range(len(RECORDED_STEPS))]


def test_first_steps_give_the_losses_recorded_before_the_speed_work(tmp_path, data_root):
    for i, (stats, expected) in enumerate(zip(_first_steps(tmp_path, data_root), RECORDED_STEPS, strict=True)):
        assert stats.keys() - {"warm_up"} == expected.keys()
        for k, value in expected.items():
            assert stats[k] == pytest.approx(value, rel=1e-4, abs=1e-10), (i, k)


def test_amp_runs_the_networks_in_bf16_and_stays_near_the_float32_losses(tmp_path, data_root, monkeypatch):
    dtypes = set()
    real = torch.nn.Conv2d._conv_forward

    def spy(self, x, weight, bias):
        out = real(self, x, weight, bias)
        dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", spy)
    steps = _first_steps(tmp_path, data_root, "--amp")
    assert dtypes == {torch.bfloat16}
    # The first step's forward shows bf16 rounding only; after a bf16-trained update the losses move
    # apart further (7.6 % for E/data at step 2 on the CPU), so the second is only checked finite.
    for k in ("E/data", "E/cycle", "E/total", "D/gp", "mask_iou"):
        assert steps[0][k] == pytest.approx(RECORDED_STEPS[0][k], rel=0.05), k
    assert all(math.isfinite(v) for v in steps[1].values())


def test_amp_keeps_the_weights_finite_over_several_steps(tmp_path, data_root):
    # In bf16 the camera head's azimuth (acos of x / r) had infinite gradients under a finite loss:
    # the weights turned NaN at the sixth step of this run before its output mappings ran in float32.
    flags = ["--hard", "--bg", "--unmask", "2", "--update_shape", "-1", "--L1", "--ganw", "0",
             "--lambda_contour", "0.1", "--lambda_depthC", "0.1", "--warm_epoch", "0", "--amp"]
    trainer = Trainer(parse_options(tiny_args(tmp_path, data_root, "amp8", *flags), {}))
    for epoch in range(4):
        trainer.train_sampler.set_epoch(epoch, 0)
        for i, batch in enumerate(trainer.train_loader):
            assert trainer._step(batch["images"], 2 * epoch + i), f"step {2 * epoch + i} was skipped"
    assert all(p.isfinite().all() for p in trainer.encoder.parameters())


def test_a_checkpoint_resumes_with_the_other_memory_layout(tmp_path, data_root):
    first = run_training(parse_options(tiny_args(tmp_path, data_root, "layout", "--niter", "1", "--channels_last"), {}))
    first_conv = next(m for m in first.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last) and not first_conv.weight.is_contiguous()
    assert first.opt_e.param_groups[0]["fused"]
    resumed = run_training(parse_options(
        tiny_args(tmp_path, data_root, "layout", "--niter", "2", "--no-channels_last", "--resume"), {}))
    assert resumed.global_step == 4
    conv = next(m for m in resumed.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous() and first.encoder.state_dict().keys() == resumed.encoder.state_dict().keys()


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


def test_enospc_while_writing_a_checkpoint_keeps_the_last_one_exits_2_and_the_next_start_resumes(
        tmp_path, data_root, straight, monkeypatch, capsys):
    args = tiny_args(tmp_path, data_root, "enospc", "--niter", "3")
    latest = tmp_path / "enospc" / "ckpts" / "latest.pt"

    def fills_during_the_second_save(path, mode):
        file = open(path, mode)
        return FullDisk(file, limit=0) if latest.exists() else file

    monkeypatch.setattr(checkpoints, "open", fills_during_the_second_save, raising=False)
    assert run_main(train.main, args) == EXIT_EXPECTED
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("train.py: error: ") and "No space left on device" in error and "needs about" in error
    assert "Traceback" not in error
    assert load_checkpoint(latest)["global_step"] == 2  # epoch 0's checkpoint is kept
    assert not any(latest.parent.glob(".*tmp*"))

    monkeypatch.undo()  # space freed
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


@pytest.mark.parametrize("images, batches", [(0, 2), (3, 1), (5, 2), (100, 2)])
def test_batchnorm_re_estimation_passes_the_set_or_the_batches_that_hold_update_bn_images(
        tmp_path, data_root, images, batches):
    # 8 training images at batch 4: a whole pass is 2 batches; a sample is rounded up to whole batches.
    trainer = Trainer(parse_options(tiny_args(tmp_path, data_root, f"bn{images}", "--update_bn",
                                              "--update_bn_images", str(images)), {}))
    trainer._recompute_bn(trainer.encoder)
    norms = [m for m in trainer.encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(int(m.num_batches_tracked) == batches for m in norms)  # update_bn restarts the count


def test_a_negative_update_bn_images_is_refused(tmp_path, data_root):
    with pytest.raises(ValueError, match="--update_bn_images must be >= 0"):
        parse_options(tiny_args(tmp_path, data_root, "bn_negative", "--update_bn_images", "-1"), {})


def test_a_separate_elevation_head_is_built_trained_and_resumed(tmp_path, data_root):
    args = tiny_args(tmp_path, data_root, "elevation_head", "--separate_elevation_head", "--update_shape", "0",
                     "--warm_epoch", "0")
    trainer = Trainer(parse_options(args, {}))
    head = trainer.encoder.camera_encoder.elevation_head[-1].weight
    before = head.detach().clone()
    assert trainer._step(next(iter(trainer.train_loader))["images"], 0)
    assert not torch.equal(head, before)  # it gets gradients from the rendering loss and is stepped
    trainer._save("latest")
    resumed = Trainer(parse_options([*args, "--resume"], {}))
    assert torch.equal(resumed.encoder.camera_encoder.elevation_head[-1].weight, head)
