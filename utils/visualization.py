"""Image grids, gifs and meshes written during training and by show_rainbow2.py / demo.py.

Gifs are written with an explicit 100 ms per frame and infinite looping (the original's imageio
defaults, which newer imageio versions no longer apply by themselves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from renderer.mesh import save_obj

FRAME_MS = 100


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
def sweep_frames(attrs, template, height: int, width: int, changes: Sequence[dict], nrow: int) -> list[np.ndarray]:
    """Render one grid frame per entry of `changes` (field -> (B,...) tensor replacing that camera field)."""
    from utils.model import render_attributes

    frames = []
    for change in changes:
        out = render_attributes(replace(attrs, **change), template, height, width)
        frames.append(to_frame(grid(out.rgb, nrow)))
    return frames


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
    save_obj(out_dir / f"{tag}_template.obj", template.verts.cpu(), template.faces.cpu(), template.face_uvs.cpu())
    sub = attrs.detach().index(torch.arange(min(16, inputs.shape[0]), device=inputs.device))
    turns = [{"azimuth_deg": sub.azimuth_deg - delta} for delta in range(0, 360, 10)]
    write_gif(out_dir / f"{tag}_rotation.gif", sweep_frames(sub, template, height, width, turns, nrow))
