"""Learning per step: test metrics of training runs after given numbers of steps, side by side.

Each run is the real training loop (`utils/trainer.py`) with a training script's defaults, the
common flags given after ``--`` and its variant's flags; it is evaluated on the test split (mask
IoU, SSIM and, on synthetic data, the 3-D metrics) after each of ``--steps`` optimisation steps and
stops after the last. Variants x seeds run as parallel processes (they share one GPU); a generated
dataset (synthetic, birds) is made once beforehand from ``--data_seed``, so every run sees the same data.
Prints a table (mean over seeds, then each seed) and writes every evaluation as a JSON line to
``<log_root>/curves.jsonl``. Not a test.

    python bench/learning_curve.py --steps 50 250 550 --seeds 0 1 \\
        --variant before="--lr_shape_backbone 1" --variant after= \\
        -- --dataset synthetic --imageSize 128 --batch 48 --bg --L1 --hard --update_shape -1

Run from the repository root (``PYTHONPATH=.`` when the project is not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = ("train", "train_market", "train_ATR2")
SHOWN = ("mask_iou", "ssim")


def script_defaults(script: str) -> dict:
    """The defaults dict of a training script (CUB_DEFAULTS, ...), read from the script beside bench/."""
    path = Path(__file__).resolve().parent.parent / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return next(v for k, v in vars(module).items() if k.endswith("_DEFAULTS"))


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant expects NAME=FLAGS (FLAGS may be empty), got {text!r}")
    return name, shlex.split(flags)


def run_one(args: argparse.Namespace, train_argv: list[str]) -> int:
    """Worker: train with `train_argv`, evaluating after each of `args.steps`; one JSON line each."""
    import torch

    from utils.metrics import evaluate
    from utils.options import parse_options
    from utils.trainer import train

    opts = parse_options(train_argv, script_defaults(args.script))
    steps = sorted(set(args.steps))
    out = Path(opts.log_root) / opts.name / "curve.jsonl"
    start = time.perf_counter()

    def on_step(trainer) -> None:
        if trainer.global_step not in steps:
            return
        metrics = evaluate(trainer.encoder, trainer.test_loader, trainer.template, trainer.d.height,
                           trainer.d.width, trainer.device, initial_verts=trainer.initial_verts)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        line = {"run": opts.name, "seed": opts.manualSeed, "step": trainer.global_step,
                "seconds": round(time.perf_counter() - start, 1), **metrics}
        with open(out, "a") as f:
            f.write(json.dumps(line) + "\n")
        if trainer.global_step == steps[-1]:
            trainer.stop_requested = True

    train(opts, on_step)
    return 0


def collect(root: Path) -> list[dict]:
    """Every evaluation of the runs under `root`, also written to `root/curves.jsonl`."""
    lines = [json.loads(line) for curve in sorted(root.glob("*/curve.jsonl"))
             for line in curve.read_text().splitlines()]
    with open(root / "curves.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return lines


def table(lines: list[dict], steps: list[int]) -> str:
    """Markdown table: one row per variant (mean over seeds) and per run, `IoU / SSIM` per step."""
    by_run: dict[str, dict[int, dict]] = {}
    for line in lines:
        by_run.setdefault(line["run"], {})[line["step"]] = line
    variants: dict[str, list[str]] = {}
    for run in sorted(by_run):
        variants.setdefault(run.rsplit("_s", 1)[0], []).append(run)
    rows = ["| run | " + " | ".join(f"{s} steps: {' / '.join(SHOWN)}" for s in steps) + " |",
            "|---|" + "---|" * len(steps)]

    def cell(values: list[dict]) -> str:
        if not values:
            return "-"
        return " / ".join(f"{sum(v[k] for v in values) / len(values):.3f}" for k in SHOWN)

    for variant, runs in variants.items():
        rows.append(f"| **{variant}** (mean of {len(runs)}) | "
                    + " | ".join(cell([by_run[r][s] for r in runs if s in by_run[r]]) for s in steps) + " |")
        for run in runs:
            rows.append(f"| {run} | " + " | ".join(cell([by_run[run][s]] if s in by_run[run] else [])
                                                  for s in steps) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 250, 550], help="evaluate after these steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="--manualSeed of the runs")
    p.add_argument("--variant", type=parse_variant, action="append", default=None,
                   help="NAME=FLAGS added to the common flags (repeat for several; default: one run as given)")
    p.add_argument("--script", choices=SCRIPTS, default="train", help="whose defaults the runs start from")
    p.add_argument("--log_root", default=None, help="run folders and curves.jsonl (default: a temporary folder)")
    p.add_argument("--parallel", type=int, default=0, help="runs at a time (0: all at once)")
    p.add_argument("--report", metavar="LOG_ROOT", default=None,
                   help="only print the table of the runs already in LOG_ROOT (e.g. of an interrupted call)")
    p.add_argument("--run", action="store_true", help=argparse.SUPPRESS)  # worker mode (one run)
    args = p.parse_args(ours)
    if args.run:
        return run_one(args, train_argv)
    if args.report:
        lines = collect(Path(args.report))
        print(table(lines, sorted({line["step"] for line in lines})))
        return 0
    if min(args.steps) < 1:
        p.error("--steps must be positive")

    from utils.model import resolve_device
    from utils.options import parse_options
    from utils.trainer import ensure_dataset

    root = Path(args.log_root or tempfile.mkdtemp(prefix="learning_curve_"))
    root.mkdir(parents=True, exist_ok=True)
    variants = args.variant or [("default", [])]
    # A generated dataset is made here, once, so that the parallel runs do not race to write it.
    first = parse_options([*train_argv, *variants[0][1]], script_defaults(args.script))
    ensure_dataset(first, resolve_device(first.device))
    jobs = []
    for seed in args.seeds:
        common = [*train_argv, "--manualSeed", str(seed), "--log_root", str(root)]
        for name, flags in variants:
            run_argv = [*common, *flags, "--name", f"{name}_s{seed}"]
            parse_options(run_argv, script_defaults(args.script))  # a bad flag fails before anything starts
            jobs.append((f"{name}_s{seed}", run_argv))

    worker = [sys.executable, str(Path(__file__).resolve()), "--run", "--script", args.script,
              "--steps", *map(str, args.steps), "--"]
    width = args.parallel or len(jobs)
    running: list[tuple[str, subprocess.Popen]] = []
    failed, stopped = [], []

    def stop(signum, frame) -> None:
        # Under a time limit: every run finishes its step and saves; the table shows what was measured.
        stopped.append(signum)
        for _, proc in running:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    start = time.perf_counter()
    for i in range(0, len(jobs), width):
        if stopped:
            break
        for name, run_argv in jobs[i:i + width]:
            log = open(root / f"{name}.out", "w")
            running.append((name, subprocess.Popen([*worker, *run_argv], stdout=log, stderr=subprocess.STDOUT)))
        for name, proc in running:
            if proc.wait() != 0:
                failed.append(name)
        running = []
    lines = collect(root)
    print(f"common flags: {shlex.join(train_argv)}")
    for name, flags in variants:
        print(f"variant {name}: {shlex.join(flags) or '(none)'}")
    print(table(lines, sorted(set(args.steps))))
    print(f"{len(jobs)} runs in {time.perf_counter() - start:.0f} s; logs and curves in {root}"
          + ("; stopped early by SIGTERM" if stopped else ""))
    if failed:
        print(f"failed runs (see {root}/<run>.out): {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
