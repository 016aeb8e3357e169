"""BatchNorm re-estimation from a sample of the training set (--update_bn_images) against a whole pass.

Loads a trained run's latest checkpoint and, for each sample size, starts again from its weights,
re-estimates the encoders' BatchNorm statistics the way `--update_bn` does after a template update
(train mode, over whole batches of a shuffled training pass) and evaluates on the test split: mask
IoU, SSIM and, on data with ground truth, the 3-D and camera errors. Size 0 is the original's whole
pass; the row "checkpoint" evaluates the statistics as saved. Prints a table with the seconds each
re-estimation took; not a test. The run folder is only read.

    python bench/bn_sample.py --name baseline --images 0 48 96
    python bench/bn_sample.py --name cub_run --log_root log --images 0 480 960 1920 --device cuda

Run from the repository root (``PYTHONPATH=.`` when the project is not installed).
"""

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from utils.metrics import evaluate
from utils.options import load_options
from utils.trainer import Trainer

COLUMNS = {"mask_iou": "IoU", "ssim": "SSIM", "chamfer_scaled_aligned": "Chamfer (aligned)",
           "azimuth_err_aligned_deg": "azimuth err", "elevation_err_deg": "elevation err",
           "distance_err": "distance err"}
"""Metrics shown (those the test split has) and their column titles."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", required=True, help="the trained run (log_root/name with opts.yaml and ckpts/latest.pt)")
    p.add_argument("--log_root", default="log", help="where the run folder is")
    p.add_argument("--images", type=int, nargs="+", default=[0, 480, 960],
                   help="sample sizes in training images (0: the whole training set)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda'")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the run's)")
    args = p.parse_args(argv)
    if any(n < 0 for n in args.images):
        p.error("--images: sample sizes are >= 0 (0: the whole training set)")
    run_dir = Path(args.log_root) / args.name
    checkpoint = run_dir / "ckpts" / "latest.pt"
    if not checkpoint.is_file():
        p.error(f"{checkpoint} not found: --name must be a run with a checkpoint in {args.log_root}/")

    opts = load_options(run_dir / "opts.yaml")
    with tempfile.TemporaryDirectory() as tmp:  # the trainer's own run folder; the run itself is only read
        opts.log_root, opts.name, opts.resume, opts.auto_resume = tmp, "bn_sample", False, False
        opts.device, opts.cuda_graphs = args.device, False
        if args.workers is not None:
            opts.workers = args.workers
        trainer = Trainer(opts)
        trainer._load(checkpoint)
        saved = copy.deepcopy(trainer.encoder.state_dict())

        def sync():
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()

        def measure(images):
            trainer.encoder.load_state_dict(saved)
            seconds = 0.0
            if images is not None:
                opts.update_bn_images = images
                sync()
                start = time.perf_counter()
                trainer._recompute_bn(trainer.encoder)
                sync()
                seconds = time.perf_counter() - start
            metrics = evaluate(trainer.encoder, trainer.test_loader, trainer.template, trainer.d.height,
                               trainer.d.width, trainer.device, initial_verts=trainer.initial_verts)
            return seconds, metrics

        train_images = trainer.train_sampler.num_batches * opts.batchSize
        print(f"{run_dir}: epoch {trainer.epoch}, {train_images} training images per pass "
              f"(batch {opts.batchSize}), {len(trainer.test_loader.dataset)} test images, device {trainer.device}")
        shown = None
        for images in [None, *args.images]:
            seconds, metrics = measure(images)
            if shown is None:
                shown = [c for c in COLUMNS if c in metrics]
                print(f"{'re-estimated from':>22} {'seconds':>8} " + " ".join(f"{COLUMNS[c]:>17}" for c in shown))
            used = trainer.bn_batches * opts.batchSize  # whole batches
            label = "checkpoint" if images is None else f"whole pass ({used})" if images == 0 else f"{used} images"
            print(f"{label:>22} {seconds:>8.2f} " + " ".join(f"{metrics[c]:>17.4f}" for c in shown), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
