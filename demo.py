"""Reconstruct one image with a trained run: textured mesh, re-rendered image and turntable gif.

`python demo.py --name RUN photo.png` takes the object mask from the image's alpha channel;
`python demo.py --name RUN photo.jpg --mask mask.png` from a grey mask of the same size (white on
the object). The image is padded (black, centred) to the run's aspect ratio and resized to its input
size, like the test images. Written to `log/RUN/demo/` (or `--out`), for an image `<stem>.*`:

- `<stem>_mesh.obj` with `<stem>_mesh.mtl` and the texture `<stem>_mesh.png`;
- `<stem>_input.png` (what the network saw) and `<stem>_recon.png` (the re-rendered image);
- `<stem>_rotation.gif`: the reconstruction turning around the vertical axis (36 frames).
"""

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import save_image

from datasets.common import binarize, fit, to_images
from utils.cli import ArgumentParser, run_main
from utils.model import add_run_arguments, open_run, render_attributes
from utils.options import derive
from utils.visualization import azimuth_sweep, save_meshes, sweep_frames, write_gif

MASK_THRESHOLD = 127
"""Mask (or alpha) grey values above this are the object."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Reconstruct a single image with a trained run: a textured .obj, the re-rendered image "
        "and a turntable gif.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_arguments(p)
    p.add_argument("image", help="input image; without --mask it needs an alpha channel marking the object")
    p.add_argument("--mask", default=None, help="grey mask of the image's size, white (> 127) on the object")
    p.add_argument("--out", default=None, help="output folder; default <log_root>/<name>/demo")
    return p


def load_image(image_path: Path, mask_path: Path | None, width: int, height: int, bg: bool) -> torch.Tensor:
    """(1,4,H,W) float32 in [0,1]: RGB (whitened unless `bg`) + binary mask, as the test loaders give.

    Raises FileNotFoundError for a missing file and ValueError for an image without a mask, a mask of
    another size or an empty mask.
    """
    for path in (image_path, mask_path):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{path} not found")
    with Image.open(image_path) as image:
        rgb = image.convert("RGB")
        transparent = "A" in image.getbands() or "transparency" in image.info
        alpha = image.convert("RGBA").getchannel("A") if transparent else None
    if mask_path is not None:
        with Image.open(mask_path) as mask_image:
            mask = mask_image.convert("L")
    elif alpha is not None:
        mask = alpha
    else:
        raise ValueError(f"{image_path} has no alpha channel, so the object is unknown: pass --mask MASK, "
                         "a grey image of the same size that is white on the object")
    if mask.size != rgb.size:
        raise ValueError(f"mask size {mask.size} differs from image size {rgb.size}")
    mask = binarize(mask, MASK_THRESHOLD)
    if mask.getbbox() is None:
        raise ValueError(f"the mask of {image_path} is empty (no value above {MASK_THRESHOLD})")
    return to_images(*fit(rgb, mask, width, height, "pad"), bg=bg)[None]


@torch.no_grad()
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    image_path = Path(args.image)
    run = open_run(args)
    d = derive(run.opts)
    images = load_image(image_path, Path(args.mask) if args.mask else None, d.width, d.height, run.opts.bg)
    images = images.to(run.template.verts.device)
    attrs = run.encoder(images, 0)
    recon = render_attributes(attrs, run.template, d.height, d.width)
    out_dir = Path(args.out) if args.out else Path(args.log_root) / args.name / "demo"
    stem = image_path.stem
    save_meshes(out_dir, attrs, run.template, [f"{stem}_mesh"])
    save_image(images[0, :3], out_dir / f"{stem}_input.png")
    save_image(recon.rgb[0], out_dir / f"{stem}_recon.png")
    frames = sweep_frames(attrs, run.template, d.height, d.width, azimuth_sweep(attrs, run.opts.azi_scope), 1)
    write_gif(out_dir / f"{stem}_rotation.gif", frames)
    print(f"azimuth {attrs.azimuth_deg.item():.1f} deg, elevation {attrs.elevation_deg.item():.1f} deg, "
          f"distance {attrs.distance.item():.2f}, look-at offset ({attrs.offset[0, 0]:.2f}, "
          f"{attrs.offset[0, 1]:.2f}); written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
