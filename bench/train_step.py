"""Training-step speed of the three training scripts' configurations, on synthetic data of their sizes.

For each configuration (the README's CUB, Market and ATR commands: batch 48, --hard, --bg, WGAN-GP,
--update_shape -1, ImageNet backbones trained from scratch) and each code version, one fresh process
(so cuDNN's algorithm search and the caches start over) builds the trainer on a generated synthetic
dataset of that image size and measures:

- first 20 steps: seconds from the first step to the end of the 20th (cuDNN benchmark, Triton
  compilation on a cold cache, allocator growth), model building excluded;
- steady state: images/s of `Trainer._step` over further steps, batches already on the GPU
  (the data loader is measured by bench/data.py);
- GPU busy: the kernels' summed GPU time per step (torch.profiler) over the steady step time;
  launches per step (kernel launches seen by the profiler) and synchronising calls per step
  (stream, device and event synchronisations) and host-device copies per step;
- epoch overhead: seconds of the template update (EM), of --update_bn's BatchNorm re-estimation and
  of one evaluation, per epoch (every --em_gap and --eval_every epochs), against the seconds of one
  epoch of the same images at the steady rate.

    python bench/train_step.py                                  # this checkout, three configurations
    python bench/train_step.py --variant before=/path/to/old/checkout --variant after=. \\
        --variant "eager=.:--no-cuda_graphs --no-channels_last"  # versions side by side, one machine
    python bench/train_step.py --configs cub --steps 30

A variant is NAME=ROOT[:FLAGS]: the checkout whose code runs, and training flags added to the
configuration's. Needs a CUDA device for the GPU columns (on the CPU they are left empty). Prints a
table (and --json writes every number); not a test. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 48
# The README's three commands (without --name), the script whose defaults they start from, and the
# synthetic set's size flags (the synthetic preset's own size is 64x64).
CONFIGS = {
    "cub": ("train", "--imageSize 128 --ratio 1 --batch 48 --gan_type wgan --bg --L1 --ganw 0 --hard --lr 7e-5 "
            "--em 7 --update_shape -1 --lambda_data 2 --unmask 2 --lambda_flat 0.01 --lambda_depthC 0.1 "
            "--drop 0.2,0.2,0 --beta1 0.95 --update_bn --gamma 0.1 --scheduler restart1 --lambda_contour 0.1 "
            "--em_gap 2"),
    "market": ("train_market", "--imageSize 64 --ratio 2 --batch 48 --gan_type wgan --bg --L1 --ganw 0 --hard "
               "--lr 5e-5 --em 7 --update_shape -1 --lambda_data 2 --unmask 2 --lambda_flat 0.02 "
               "--lambda_depthR 0.15 --drop 0.2,0.2,0 --beta1 0.95 --clean 0.36,0.49 --em_gap 2 --pretrainc none"),
    "atr": ("train_ATR2", "--imageSize 96 --ratio 1.666666 --batch 48 --gan_type wgan --bg --L1 --ganw 0 --hard "
            "--lr 5.5e-5 --em 7 --update_shape -1 --lambda_data 2 --unmask 2 --lambda_flat 0.01 "
            "--lambda_depthR 0.15 --drop 0.2,0.2,0.2 --beta1 0.95 --clean 0.18,0.26 --em_gap 2 --pretrainc none"),
}
# The synthetic preset would switch the backbones to 'none' and evaluate every 2 epochs: keep the
# scripts' backbones (trained from scratch) and evaluation schedule (the default, every 20 epochs).
SYNTHETIC = "--dataset synthetic --pretrains hr18sv2 --pretraint res34 --no-pretrained --threshold 0.01,0.99 " \
            "--clean_threshold 0.01,0.99 --eval_every 20"
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
# A CUDA graph's replay is one launch (cudaGraphLaunch) for all the kernels it holds.
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


def measure(args) -> None:
    """One configuration, one code version (in this process; `args.root` is already on sys.path):
    prints 'RESULT {json}' lines, the last one complete."""
    import faulthandler
    import importlib

    import torch

    # A measurement that hangs prints where every thread stands and ends, instead of stalling the table.
    faulthandler.dump_traceback_later(args.timeout, exit=True)

    from utils.options import parse_options
    from utils.trainer import Trainer

    script, flags = CONFIGS[args.config]
    defaults = importlib.import_module(script)
    defaults = next(v for k, v in vars(defaults).items() if k.endswith("_DEFAULTS"))
    work = Path(args.workdir)
    argv = shlex.split(f"{flags} {SYNTHETIC}") + [
        "--dataroot", str(work / f"data_{args.config}"), "--log_root", str(work / "log"),
        "--name", f"{args.config}_{os.getpid()}", "--synthetic_train", str(args.train_images),
        "--synthetic_test", str(args.test_images), "--workers", str(args.workers), "--device", args.device,
    ] + shlex.split(args.flags)
    opts = parse_options(argv, defaults)
    trainer = Trainer(opts)
    cuda = trainer.device.type == "cuda"
    if cuda:  # the profiler started once before any CUDA graph exists: profiling replays can hang otherwise
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
            pass

    def sync():
        if cuda:
            torch.cuda.synchronize()

    trainer.train_sampler.set_epoch(0, 0)
    batches = []
    for batch in trainer.train_loader:
        batches.append(batch["images"].to(trainer.device))
        if len(batches) == 4:
            break
    step = 0
    began = time.perf_counter()

    def phase(text: str) -> None:  # the log says where a slow or stuck measurement stands
        print(f"[{time.perf_counter() - began:7.1f} s] {text}", file=sys.stderr, flush=True)

    def run(n: int) -> float:
        nonlocal step
        sync()
        start = time.perf_counter()
        for _ in range(n):
            trainer._step(batches[step % len(batches)], step)
            step += 1
        sync()
        return time.perf_counter() - start

    result = {"config": args.config, "flags": args.flags, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    phase("first 20 steps")
    result["first20_s"] = run(20)
    phase("steady state")
    run(3)  # a few more so that each mode of the alternation has met its shapes many times
    seconds = run(args.steps)
    result["step_ms"] = 1000 * seconds / args.steps
    result["images_per_s"] = BATCH * args.steps / seconds
    print("RESULT " + json.dumps(result), flush=True)  # the step's speed, should the rest fail
    if cuda:
        profiled = 6  # two cycles of the three-mode alternation
        phase("profiling")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(profiled)
        events = prof.events()
        kernel_us = sum(e.time_range.elapsed_us() for e in events if e.device_type.name == "CUDA")
        result["gpu_ms_per_step"] = kernel_us / 1000 / profiled
        result["gpu_busy"] = result["gpu_ms_per_step"] / result["step_ms"]
        result["launches_per_step"] = sum(e.name in LAUNCH_CALLS for e in events) / profiled
        result["syncs_per_step"] = sum(e.name in SYNC_CALLS for e in events) / profiled
        result["copies_per_step"] = sum(e.name.startswith("cudaMemcpy") for e in events) / profiled
        if args.top_ops:  # where the GPU time goes, into the measurement's log
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top_ops),
                  file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(result), flush=True)
    # Epoch overhead: the EM template update, --update_bn's re-estimation and one evaluation. The update
    # re-estimates only when it is accepted, which a fresh model's often is not: both are timed apart.
    def timed(call) -> float:
        sync()
        start = time.perf_counter()
        call()
        sync()
        return time.perf_counter() - start

    phase("template update")
    update_bn, opts.update_bn = opts.update_bn, False
    result["template_update_s"] = timed(trainer._update_template)
    opts.update_bn = update_bn
    if update_bn:
        phase("BatchNorm re-estimation")
        result["bn_reestimation_s"] = timed(lambda: trainer._recompute_bn(trainer.encoder))
    phase("evaluation")
    result["evaluation_s"] = timed(lambda: trainer._evaluate(0))
    result["epoch_s"] = len(trainer.train_loader.dataset) / result["images_per_s"]
    # Per epoch: the template update (and the re-estimation) every --em_gap epochs; the evaluation every
    # --eval_every.
    em = result["template_update_s"] + result.get("bn_reestimation_s", 0.0)
    per_epoch = em / opts.em_gap + result["evaluation_s"] / opts.eval_every
    result["overhead_fraction"] = per_epoch / result["epoch_s"]
    print("RESULT " + json.dumps(result), flush=True)
    phase("done")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["cub", "market", "atr"])
    p.add_argument("--variant", action="append", default=None,
                   help="NAME=ROOT[:FLAGS]: code checkout and extra training flags (repeatable; default 'this=.')")
    p.add_argument("--steps", type=int, default=30, help="steady-state steps timed")
    p.add_argument("--train_images", type=int, default=960, help="synthetic training images (the epoch size)")
    p.add_argument("--test_images", type=int, default=96, help="synthetic test images (the evaluation's size)")
    p.add_argument("--workers", type=int, default=8, help="loader workers of the template update / evaluation")
    p.add_argument("--device", default="auto")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds one measurement may take; past it, it prints its threads' stacks to its log "
                        "and ends, and the table keeps what it had measured")
    p.add_argument("--top_ops", type=int, default=0,
                   help="also write the N ops with the most GPU time (profiled steps) into each measurement's log")
    p.add_argument("--json", default=None, help="also write every measurement to this file (JSON lines)")
    p.add_argument("--workdir", default=None, help="where the synthetic data and run folders go (default: temp)")
    # internal: one measurement in this process
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--flags", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.config:
        sys.path.insert(0, str(Path(args.root).resolve()))
        measure(args)
        return 0

    variants = []
    for text in args.variant or ["this=."]:
        name, _, rest = text.partition("=")
        root, _, flags = rest.partition(":")
        if not name or not Path(root, "utils", "trainer.py").is_file():
            p.error(f"--variant {text!r}: expected NAME=ROOT[:FLAGS] with ROOT a checkout of this project")
        variants.append((name, root, flags))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="train_step_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for config in args.configs:
        for name, root, flags in variants:
            cmd = [sys.executable, __file__, "--config", config, "--root", root, f"--flags={flags}",
                   "--steps", str(args.steps), "--train_images", str(args.train_images),
                   "--test_images", str(args.test_images), "--timeout", str(args.timeout),
                   "--top_ops", str(args.top_ops), "--workers", str(args.workers), "--device", args.device,
                   "--workdir", str(workdir)]
            path = [str(Path(root).resolve()), *filter(None, [os.environ.get("PYTHONPATH")])]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
            log_path = workdir / f"{config}_{name}.log"
            with open(log_path, "w") as log_file:  # the measurement's own log, readable while it runs
                proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log_file, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0:
                tail = log_path.read_text()[-3000:]
                print(f"{config} / {name}: failed (rc {proc.returncode}; log {log_path})\n{tail}",
                      file=sys.stderr, flush=True)
            if not lines:
                continue
            row = {"variant": name, **json.loads(lines[-1][len("RESULT "):])}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")

    columns = [("images/s", "images_per_s", ".1f"), ("step ms", "step_ms", ".1f"),
               ("GPU ms/step", "gpu_ms_per_step", ".1f"), ("GPU busy", "gpu_busy", ".0%"),
               ("launches/step", "launches_per_step", ".0f"), ("syncs/step", "syncs_per_step", ".0f"),
               ("copies/step", "copies_per_step", ".0f"), ("first 20 steps s", "first20_s", ".1f"),
               ("template update s", "template_update_s", ".2f"), ("BN re-estimation s", "bn_reestimation_s", ".2f"),
               ("evaluation s", "evaluation_s", ".2f"),
               ("epoch s", "epoch_s", ".2f"), ("overhead", "overhead_fraction", ".0%")]
    print(f"\n{rows[0]['device'] if rows else ''}, batch {BATCH}, {args.train_images} images an epoch")
    print("| config | variant | " + " | ".join(c[0] for c in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for r in rows:
        cells = [format(r[key], spec) if key in r else "-" for _, key, spec in columns]
        print(f"| {r['config']} | {r['variant']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
