"""Image grids, gifs and meshes written during training and by show_rainbow2.py / demo.py.

Gifs are written with an explicit 100 ms per frame and infinite looping (the original's imageio
defaults, which newer imageio versions no longer apply by themselves).

The camera sweeps (data-eval-vis.md §4.1) are lists of attribute changes, one per frame, that
`sweep_frames` renders: `azimuth_sweep` (36 frames for a 360-degree scope), `elevation_sweep`,
`distance_sweep` and `offset_sweep` (22 frames); `rainbow_frames` renders the appearance-swap grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from renderer.mesh import save_obj
from utils.model import render_attributes

FRAME_MS = 100
AZIMUTH_STEP_DEG = 10
ELEVATION_STEP_DEG = 5
DISTANCE_STEP = 0.5
OFFSET_VALUES = torch.linspace(-0.5, 0.5, 11)
"""Look-at shifts of `offset_sweep`, first along x then along y."""
RAINBOW_SOURCES = 7
"""Images of the appearance-swap grid (rows: texture donors, columns: shape and camera donors)."""


def to_frame(image: torch.Tensor) -> np.ndarray:
    """(3,H,W) float in [0,1] -> (H,W,3) uint8 (truncating, like the original)."""
    return (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)


def write_gif(path: Path, frames: Sequence[np.ndarray]) -> None:
    """Write (H,W,3) uint8 frames as a looping gif, 100 ms per frame."""
    if not frames:
        raise ValueError(f"no frames to write to {path}")
    imageio.mimsave(path, list(frames), duration=FRAME_MS, loop=0)


def grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """(B,3,H,W) -> (3,H',W') tiled with 2-px black gutters."""
    return make_grid(images.detach().cpu(), nrow=nrow, padding=2, pad_value=0.0)


def grid_columns(height: int, width: int) -> int:
    """Images per grid row: 8 for tall (1:2) images, 4 for square ones, as the original chose."""
    return 8 if height >= 2 * width else 4


@torch.no_grad()
def sweep_frames(attrs, template, height: int, width: int, changes: Sequence[dict],
                 nrow: int) -> list[np.ndarray]:
    """Render one grid frame per entry of `changes` (field -> (B,...) tensor replacing that camera field)."""
    frames = []
    for change in changes:
        out = render_attributes(replace(attrs, **change), template, height, width)
        frames.append(to_frame(grid(out.rgb, nrow)))
    return frames


def _full(attrs, value: float) -> torch.Tensor:
    return torch.full_like(attrs.azimuth_deg, float(value))


def azimuth_sweep(attrs, azi_scope: float = 360.0) -> list[dict]:
    """Turntable: azimuth = predicted - delta for delta = 0, 10, ... < azi_scope degrees, so the first
    frame is the reconstruction (36 frames for 360)."""
    return [{"azimuth_deg": attrs.azimuth_deg - float(delta)}
            for delta in np.arange(0, azi_scope, AZIMUTH_STEP_DEG)]


def elevation_sweep(attrs, elev_range: tuple[float, float]) -> list[dict]:
    """Elevation set to lo, lo + 5, ... < hi degrees (6 frames for 0~30), inside the trained range
    (the original negated them, which shows CUB birds from below); a one-value range gives its
    single elevation."""
    lo, hi = elev_range
    return [{"elevation_deg": _full(attrs, e)} for e in np.arange(lo, max(hi, lo + 1), ELEVATION_STEP_DEG)]


def distance_sweep(attrs, dist_range: tuple[float, float]) -> list[dict]:
    """Distance set to lo, lo + 0.5, ... < hi + 1 (12 frames for 2~7), always positive."""
    lo, hi = dist_range
    return [{"distance": _full(attrs, d)} for d in np.arange(lo, hi + 1, DISTANCE_STEP)]


def offset_sweep(attrs) -> list[dict]:
    """Front view (azimuth 0) with the look-at point moved along x, then along y, over -0.5..0.5
    (22 frames); elevation, distance and light as predicted."""
    front = _full(attrs, 0.0)
    frames = []
    for axis in (0, 1):
        for v in OFFSET_VALUES.tolist():
            offset = torch.zeros_like(attrs.offset)
            offset[:, axis] = v
            frames.append({"azimuth_deg": front, "offset": offset})
    return frames


@torch.no_grad()
def rainbow_frames(inputs: torch.Tensor, attrs, template, height: int, width: int,
                   azi_scope: float = 360.0) -> list[np.ndarray]:
    """The appearance-swap ("rainbow") gif: every texture on every shape, turning.

    With n = min(7, B) images, each frame is an (n+1) x (n+1) grid: the first row shows the inputs
    (shape donors), the first column the inputs again (texture donors), the corner is white, and
    cell (i+1, j+1) renders sample j's shape, elevation, distance, offset and light with sample i's
    texture, at absolute azimuth -delta for delta = 0, 10, ... < azi_scope. Every cell has a 2-px black
    border; cells are tiled with 20-px white gutters (an 8x8 grid of 64x128 images is 724x1236).

    Args:
        inputs: (B,3,H,W) input images in [0,1]; attrs: their attributes (batch B).
    Returns:
        (H',W',3) uint8 frames.
    """
    n = min(RAINBOW_SOURCES, attrs.batch_size)
    index = torch.arange(n, device=attrs.azimuth_deg.device)
    texture_donor, shape_donor = index.repeat_interleave(n), index.repeat(n)
    pairs = replace(attrs.index(shape_donor), texture=attrs.texture[texture_donor])
    inputs = inputs[:n].detach().cpu()
    corner = torch.ones(1, 3, height, width)
    frames = []
    for delta in np.arange(0, azi_scope, AZIMUTH_STEP_DEG):
        out = render_attributes(replace(pairs, azimuth_deg=_full(pairs, -delta)), template, height, width)
        renders = out.rgb.cpu().reshape(n, n, 3, height, width)
        rows = [torch.cat([corner, inputs])] + [torch.cat([inputs[i:i + 1], renders[i]]) for i in range(n)]
        cells = F.pad(torch.cat(rows), (2, 2, 2, 2), value=0.0)
        frames.append(to_frame(make_grid(cells, nrow=n + 1, padding=20, pad_value=1.0)))
    return frames


def save_meshes(out_dir: Path, attrs, template, names: Sequence[str]) -> list[Path]:
    """Write each sample's mesh (template + its offsets) as `<out_dir>/<name>.obj`, with its texture
    as `<name>.png` and `<name>.mtl`. Returns the .obj paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(names) != attrs.batch_size:
        raise ValueError(f"{len(names)} names for {attrs.batch_size} meshes")
    faces, face_uvs = template.faces.cpu(), template.face_uvs.cpu()
    paths = []
    for verts, texture, name in zip(attrs.verts, attrs.texture, names, strict=True):
        paths.append(out_dir / f"{name}.obj")
        save_obj(paths[-1], verts.cpu(), faces, face_uvs, texture_image=texture.clamp(0, 1).cpu())
    return paths


@torch.no_grad()
def save_epoch_visuals(run_dir: Path, epoch: int, inputs, recon, novel, attrs, template) -> None:
    """Training snapshot: input / reconstruction / novel-view grids, the textures, sample 0's mesh,
    the current template, and an azimuth turntable gif of the batch (at most 16 images)."""
    out_dir = Path(run_dir) / "visuals"
    out_dir.mkdir(parents=True, exist_ok=True)
    height, width = inputs.shape[-2:]
    nrow = grid_columns(height, width)
    tag = f"epoch_{epoch:03d}"
    for name, images in (("input", inputs[:, :3]), ("recon", recon[:, :3]), ("novel", novel[:, :3]),
                         ("texture", attrs.texture.clamp(0, 1))):
        save_image(grid(images, nrow), out_dir / f"{tag}_{name}.png")
    save_obj(out_dir / f"{tag}_mesh_recon.obj", attrs.verts[0].cpu(), template.faces.cpu(),
             template.face_uvs.cpu(), texture_image=attrs.texture[0].clamp(0, 1).cpu())
    save_obj(out_dir / f"{tag}_template.obj", template.verts.cpu(), template.faces.cpu(),
             template.face_uvs.cpu())
    sub = attrs.detach().index(torch.arange(min(16, inputs.shape[0]), device=inputs.device))
    frames = sweep_frames(sub, template, height, width, azimuth_sweep(sub), nrow)
    write_gif(out_dir / f"{tag}_rotation.gif", frames)
