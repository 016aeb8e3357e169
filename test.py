"""Evaluate a trained run on the test split of its dataset (data-eval-vis.md §3).

`python test.py --name RUN` rebuilds the model from `log/RUN/opts.yaml` and a checkpoint (best by
default), then reports mask IoU and SSIM (CUB: also at 2x, as the original test.py), parameters and
FLOPs per encoder, FID when Inception weights are given, and for synthetic data the 3-D metrics
against the ground truth. It prints a table and appends one JSON line to `log/RUN/metrics.jsonl`.
"""

import argparse
import json
import sys
from pathlib import Path

from torch.utils.data import DataLoader
from torchvision.utils import save_image

from utils.cli import ArgumentParser, run_main
from utils.metrics import FID_WEIGHTS_NAME, encoder_complexity, evaluate, load_fid_inception, whiten
from utils.model import add_run_arguments, build_template, evaluation_split, open_run
from utils.options import derive

CUB_SSIM_UPSCALE = 2
"""The original test.py measures CUB's SSIM on 2x bicubic upscales (256x256)."""

ROWS = [  # (result key, label, format)
    ("mask_iou", "mask IoU (soft)", "{:.4f}"),
    ("ssim", "SSIM", "{:.4f}"),
    (f"ssim_x{CUB_SSIM_UPSCALE}", f"SSIM at {CUB_SSIM_UPSCALE}x (bicubic)", "{:.4f}"),
    ("fid_recon", "FID reconstruction", "{:.2f}"),
    ("fid_rotation", "FID random azimuth", "{:.2f}"),
    ("fid_rotation90", "FID azimuth +-90", "{:.2f}"),
    ("chamfer", "Chamfer (squared, centred)", "{:.5f}"),
    ("chamfer_template", "Chamfer of the initial template", "{:.5f}"),
    ("chamfer_scaled", "Chamfer, scale aligned", "{:.5f}"),
    ("chamfer_template_scaled", "Chamfer of the template, scale aligned", "{:.5f}"),
    ("azimuth_err_deg", "azimuth error (deg)", "{:.2f}"),
    ("azimuth_err_mirror_deg", "azimuth error, front/back mirror ok", "{:.2f}"),
    ("frame_turn_deg", "turn of the learned frame (deg)", "{:.0f}"),
    ("chamfer_aligned", "Chamfer, frame aligned", "{:.5f}"),
    ("chamfer_scaled_aligned", "Chamfer, frame + scale aligned", "{:.5f}"),
    ("azimuth_err_aligned_deg", "azimuth error, frame aligned", "{:.2f}"),
    ("elevation_err_deg", "elevation error (deg)", "{:.2f}"),
    ("distance_err", "distance error", "{:.3f}"),
    ("distance_err_scaled", "distance error, scale aligned", "{:.3f}"),
    ("offset_err", "look-at offset error", "{:.3f}"),
]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Evaluate a trained run on its test split: mask IoU, SSIM, FID (optional), parameters "
        "and FLOPs, and 3-D errors on synthetic data. Appends a JSON line to <log_root>/<name>/metrics.jsonl "
        "and prints a table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_arguments(p)
    p.add_argument("--dataroot", default=None, help="dataset folder; default: the one in the run's opts.yaml")
    p.add_argument("--batchSize", type=int, default=None, help="test images per batch; default: the run's")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--jpeg", action=argparse.BooleanOptionalAction, default=False,
                   help="measure on quality-100 JPEG round trips of images and masks, as the original did")
    p.add_argument("--ssim_upscale", type=int, default=None,
                   help="also report the SSIM after this bicubic upscale factor; default "
                   f"{CUB_SSIM_UPSCALE} for CUB (the original test.py), else 1 (none)")
    p.add_argument("--inception", default=None,
                   help=f"local path of pytorch-fid's {FID_WEIGHTS_NAME}; without it FID is skipped")
    p.add_argument("--seed", type=int, default=0, help="seed of the random azimuths of the rotation FID")
    p.add_argument("--save-images", action="store_true",
                   help="write each test image's input, reconstruction and predicted mask to "
                   "<log_root>/<name>/test_images/")
    return p


class ImageWriter:
    """`evaluate` callback writing `<index>_<stem>_{input,recon,mask}.png` per test image."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def __call__(self, batch, attrs, recon) -> None:
        inputs = whiten(batch["images"])
        for k, path in enumerate(batch["path"]):
            stem = f"{self.count:05d}_{Path(path).stem}"
            save_image(inputs[k], self.out_dir / f"{stem}_input.png")
            save_image(recon.rgb[k], self.out_dir / f"{stem}_recon.png")
            save_image(recon.silhouette[k], self.out_dir / f"{stem}_mask.png")
            self.count += 1


def format_table(line: dict) -> str:
    out = [f"run {line['run']}: checkpoint {line['checkpoint']} (epoch {line['epoch']}"
           f"{', SWA' if line['swa'] else ''}), {line['num_images']} test images, {line['dataset']}"
           f"{', JPEG round trips' if line['jpeg'] else ''}"]
    out += [f"  {label:<38} {fmt.format(line[key])}" for key, label, fmt in ROWS if key in line]
    if "fid_recon" not in line:
        out.append(f"  FID skipped: pass --inception PATH (pytorch-fid's {FID_WEIGHTS_NAME}) to compute it")
    height, width = line["input_size"]
    out.append(f"\n  {'encoder':<12} {'params (M)':>11} {'GFLOPs':>9}   at 1x4x{height}x{width}, "
               "multiply-add = 2 FLOPs (torch.utils.flop_counter)")
    for part, c in line["complexity"].items():
        out.append(f"  {part:<12} {c['params'] / 1e6:>11.3f} {c['flops'] / 1e9:>9.3f}")
    return "\n".join(out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run = open_run(args)
    opts, d = run.opts, derive(run.opts)
    device = run.template.verts.device
    run_dir = Path(args.log_root) / args.name
    dataset = evaluation_split(opts, args.dataroot)
    loader = DataLoader(dataset, batch_size=args.batchSize or opts.batchSize, shuffle=False,
                        num_workers=args.workers)
    ssim_upscale = args.ssim_upscale
    if ssim_upscale is None:
        ssim_upscale = CUB_SSIM_UPSCALE if opts.dataset == "cub" else 1
    inception = load_fid_inception(args.inception, device) if args.inception else None
    writer = ImageWriter(run_dir / "test_images") if args.save_images else None
    metrics = evaluate(run.encoder, loader, run.template, d.height, d.width, device,
                       ssim_upscale=ssim_upscale, jpeg=args.jpeg, progress=True, inception=inception,
                       azi_scope=opts.azi_scope, seed=args.seed, on_batch=writer,
                       initial_verts=build_template(opts).verts)
    line = {
        "source": "test.py", "run": str(run_dir), "checkpoint": str(run.checkpoint_path), "epoch": run.epoch,
        "swa": args.swa, "dataset": opts.dataset, "num_images": len(dataset), "jpeg": args.jpeg,
        "input_size": [d.height, d.width], **metrics,
        "complexity": encoder_complexity(run.encoder, d.height, d.width),
    }
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    print(format_table(line))
    if writer is not None:
        print(f"\n  images written to {writer.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
