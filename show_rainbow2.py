"""Write the five gif animations of a trained run into its run folder (data-eval-vis.md §4.1).

`python show_rainbow2.py --name RUN` encodes the chosen test images (default: the first 32) and
writes, into `log/RUN/`:

- `current_rainbow.gif`: appearance swap, every texture on every shape of the first 7 images,
  turning (36 frames; 8x8 cells with 2-px black borders and 20-px white gutters);
- `current_rotation.gif`: azimuth turntable from the reconstruction view (36 frames);
- `current_rotation_ele.gif`: elevation over the trained range in 5-degree steps;
- `current_rotation_dist.gif`: distance from the range's minimum to its maximum + 0.5, step 0.5;
- `current_rotation_XY.gif`: front view, look-at point moved along x then y over -0.5..0.5 (22 frames);
- `current_input.png`, `current_recon.png`, `current_textures.png`, and `meshes/`: each image's
  reconstructed mesh as .obj with its texture (.png, .mtl) and the learned template.
"""

import argparse
import sys
from pathlib import Path

import torch
from torchvision.utils import save_image

from renderer.mesh import save_obj
from utils.cli import ArgumentParser, run_main
from utils.model import add_run_arguments, evaluation_split, open_run, render_attributes
from utils.options import derive
from utils.visualization import (
    azimuth_sweep,
    distance_sweep,
    elevation_sweep,
    grid,
    grid_columns,
    offset_sweep,
    rainbow_frames,
    save_meshes,
    sweep_frames,
    write_gif,
)

DEFAULT_IMAGES = 32
"""The original shows one batch of 32 test images."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Write the appearance-swap and camera-sweep gifs, image grids and meshes of a trained "
        "run into <log_root>/<name>/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_arguments(p)
    p.add_argument("--dataroot", default=None, help="dataset folder; default: the one in the run's opts.yaml")
    p.add_argument("--indices", type=int, nargs="+", default=None,
                   help="positions in the test split of the images to show; default: the first --num_images")
    p.add_argument("--num_images", type=int, default=DEFAULT_IMAGES,
                   help="how many test images to show when --indices is not given")
    return p


def select(dataset, indices: list[int] | None, num_images: int) -> list[int]:
    """The test-split positions to show; raises ValueError for positions outside the split."""
    if indices is None:
        if num_images < 1:
            raise ValueError(f"--num_images must be at least 1, got {num_images}")
        return list(range(min(num_images, len(dataset))))
    outside = [i for i in indices if not 0 <= i < len(dataset)]
    if outside:
        raise ValueError(f"--indices {outside} outside the test split, which has {len(dataset)} images "
                         f"(positions 0..{len(dataset) - 1})")
    return indices


@torch.no_grad()
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run = open_run(args)
    opts, d = run.opts, derive(run.opts)
    height, width, device = d.height, d.width, run.template.verts.device
    run_dir = Path(args.log_root) / args.name
    dataset = evaluation_split(opts, args.dataroot)
    items = [dataset[i] for i in select(dataset, args.indices, args.num_images)]
    images = torch.stack([item["images"] for item in items]).to(device)
    attrs = run.encoder(images, 0)
    recon = render_attributes(attrs, run.template, height, width)
    nrow = grid_columns(height, width)

    grids = {"input": images[:, :3], "recon": recon.rgb, "textures": attrs.texture.clamp(0, 1)}
    for name, batch in grids.items():
        save_image(grid(batch, nrow), run_dir / f"current_{name}.png")
    rainbow = rainbow_frames(images[:, :3], attrs, run.template, height, width, opts.azi_scope)
    write_gif(run_dir / "current_rainbow.gif", rainbow)
    sweeps = {
        "current_rotation.gif": azimuth_sweep(attrs, opts.azi_scope),
        "current_rotation_ele.gif": elevation_sweep(attrs, d.elev_range),
        "current_rotation_dist.gif": distance_sweep(attrs, d.dist_range),
        "current_rotation_XY.gif": offset_sweep(attrs),
    }
    for file_name, changes in sweeps.items():
        write_gif(run_dir / file_name, sweep_frames(attrs, run.template, height, width, changes, nrow))
    names = [f"{k:02d}_{Path(item['path']).stem}" for k, item in enumerate(items)]
    save_meshes(run_dir / "meshes", attrs, run.template, names)
    t = run.template
    save_obj(run_dir / "meshes" / "template.obj", t.verts.cpu(), t.faces.cpu(), t.face_uvs.cpu())
    print(f"{len(items)} test images: gifs and grids written to {run_dir}, meshes to {run_dir / 'meshes'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
