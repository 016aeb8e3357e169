"""The full render pipeline: spec T4 cube values, composition, non-square images, gradients, reference image.

The reference image ``tests/data/sphere_reference.png`` (RGBA: lit RGB, alpha = soft silhouette) is
compared with a tolerance of one 8-bit step. After a deliberate change of the rendered picture,
regenerate it with

    REGENERATE_REFERENCE=1 python -m pytest tests/test_render.py -k reference

and look at the new PNG before committing it.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from renderer.mesh import icosphere
from renderer.render import render
from renderer.shading import mask_iou

REFERENCE_PNG = Path(__file__).parent / "data" / "sphere_reference.png"

CUBE_VERTS = 0.5 * torch.tensor(
    [[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1], [-1, -1, 1], [1, -1, 1], [1, 1, 1], [-1, 1, 1]],
    dtype=torch.float64,
)
CUBE_FACES = torch.tensor(
    [[4, 5, 6], [4, 6, 7], [0, 3, 2], [0, 2, 1], [1, 2, 6], [1, 6, 5],
     [0, 4, 7], [0, 7, 3], [3, 7, 6], [3, 6, 2], [0, 1, 5], [0, 5, 4]]
)
SH_Y0 = 0.28209479177
SH_Y1 = 0.4886025119


def _render_cube(height, width, dtype=torch.float64, texture_value=1.0, light=None, background=None):
    """Unit cube seen from (0, 0, 3) looking at the origin (spec T4), constant texture."""
    light = torch.tensor([[1 / SH_Y0, 0, 0, 0, 0, 0, 0, 0, 0]]) if light is None else light
    return render(
        CUBE_VERTS.to(dtype)[None], CUBE_FACES, torch.full((12, 3, 2), 0.5, dtype=dtype),
        torch.zeros(1, dtype=dtype), torch.zeros(1, dtype=dtype), torch.full((1,), 3.0, dtype=dtype),
        torch.zeros(1, 2, dtype=dtype), torch.full((1, 3, 4, 4), texture_value, dtype=dtype),
        light.to(dtype), height, width, background=background,
    )


# size, covered pixels, sum of S, edge pixel, its S, corner pixel, its S, mask IoU loss (spec T4).
CUBE_CASES = [
    (64, 1024, 1067.3893, (31, 48), 0.329320, (15, 48), 0.181244, 0.0406499),
    (128, 4096, 4325.9031, (63, 96), 0.879107, (31, 96), 0.964046, 0.0531456),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("size", "covered", "mask_sum", "edge", "edge_s", "corner", "corner_s", "iou_loss"),
                         CUBE_CASES)
def test_cube_t4(dtype, size, covered, mask_sum, edge, edge_s, corner, corner_s, iou_loss):
    out = _render_cube(size, size, dtype)
    assert out.rgb.shape == (1, 3, size, size) and out.rgb.dtype == dtype
    assert out.silhouette.shape == (1, 1, size, size)
    hard = out.face_idx[0] >= 0
    assert int(hard.sum()) == covered
    quarter = slice(size // 4, 3 * size // 4)
    assert bool(hard[quarter, quarter].all())
    assert set(out.face_idx[0][hard].tolist()) == {0, 1}  # only the front square is visible
    mask = out.silhouette[0, 0]
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-6, "rtol": 0}
    torch.testing.assert_close(mask.sum().item(), mask_sum, atol=1e-3, rtol=0)
    torch.testing.assert_close(mask[edge].item(), edge_s, **tol)
    torch.testing.assert_close(mask[corner].item(), corner_s, **tol)
    loss = 1 - mask_iou(mask[None], hard[None].to(dtype))
    torch.testing.assert_close(loss.item(), iou_loss, **tol)


def test_cube_normals_and_culling():
    normals = _render_cube(16, 16).face_normals[0]
    expected_z = torch.tensor([1, 1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(normals[:, 2], expected_z)
    torch.testing.assert_close(torch.linalg.vector_norm(normals, dim=1), torch.ones(12, dtype=torch.float64))


def test_composition_white_and_given_background():
    light = torch.tensor([[1.5, 0.0, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    front_coef = 1.5 * SH_Y0 + 0.4 * SH_Y1  # normal (0, 0, 1)
    white = _render_cube(64, 64, texture_value=0.6, light=light)
    hard = white.face_idx[0] >= 0
    torch.testing.assert_close(white.rgb[0][:, hard], torch.full((3, 1024), 0.6 * front_coef, dtype=torch.float64))
    assert bool((white.rgb[0][:, ~hard] == 1).all())  # soft-mask pixels are still background

    background = torch.linspace(0, 1, 3 * 64 * 64, dtype=torch.float64).reshape(1, 3, 64, 64)
    lit = _render_cube(64, 64, texture_value=0.6, light=light, background=background)
    torch.testing.assert_close(lit.rgb[0][:, hard], white.rgb[0][:, hard])
    # On the background the normal is 0, so the coefficient is 1.5 * Y0.
    expected_bg = (background[0] * 1.5 * SH_Y0).clamp(0, 1)
    torch.testing.assert_close(lit.rgb[0][:, ~hard], expected_bg[:, ~hard])


def test_non_square_image():
    out = _render_cube(64, 128)
    assert out.rgb.shape == (1, 3, 64, 128) and out.face_idx.shape == (1, 64, 128)
    expected = torch.zeros(64, 128, dtype=torch.bool)
    expected[16:48, 48:80] = True  # square pixels: the front square is 32 x 32 in both directions
    assert torch.equal(out.face_idx[0] >= 0, expected)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="background"):
        _render_cube(16, 16, background=torch.ones(1, 3, 16, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="verts"):
        render(CUBE_VERTS, CUBE_FACES, torch.zeros(12, 3, 2), *(torch.zeros(1),) * 3, torch.zeros(1, 2),
               torch.ones(1, 3, 2, 2), torch.zeros(1, 9), 8, 8)


@pytest.mark.parametrize("with_background", [False, True])
def test_gradients_reach_every_input(with_background):
    generator = torch.Generator().manual_seed(0)
    verts, faces, face_uvs = icosphere(2)
    inputs = {
        "verts": verts.double()[None].repeat(2, 1, 1),
        "azimuth_deg": torch.tensor([20.0, -60.0], dtype=torch.float64),
        "elevation_deg": torch.tensor([10.0, -15.0], dtype=torch.float64),
        "distance": torch.tensor([2.5, 3.0], dtype=torch.float64),
        "offset": torch.tensor([[0.05, -0.02], [-0.1, 0.03]], dtype=torch.float64),
        "texture": 0.2 + 0.6 * torch.rand(2, 3, 8, 16, generator=generator, dtype=torch.float64),
        "light": torch.tensor([[2.5, 0.2, 0.3, 0.1, 0, 0, 0.1, 0, 0]] * 2, dtype=torch.float64),
    }
    if with_background:
        inputs["background"] = 0.1 + 0.5 * torch.rand(2, 3, 24, 32, generator=generator, dtype=torch.float64)
    for tensor in inputs.values():
        tensor.requires_grad_()
    out = render(faces=faces, face_uvs=face_uvs.double(), height=24, width=32, **inputs)
    weights = torch.rand(out.rgb.shape, generator=generator, dtype=torch.float64)
    ((out.rgb * weights).sum() + out.silhouette.sum()).backward()
    for name, tensor in inputs.items():
        assert tensor.grad is not None and bool(torch.isfinite(tensor.grad).all()), name
        assert bool((tensor.grad.reshape(2, -1) != 0).any(dim=1).all()), f"{name} has a sample without gradient"


def test_silhouette_shrinks_with_distance():
    verts, faces, face_uvs = icosphere(2)
    distance = torch.tensor([2.5], requires_grad=True)
    out = render(verts[None], faces, face_uvs, torch.zeros(1), torch.zeros(1), distance, torch.zeros(1, 2),
                 torch.ones(1, 3, 4, 4), torch.zeros(1, 9), 32, 32)
    out.silhouette.sum().backward()
    assert distance.grad.item() < 0


def _reference_scene():
    """A lit, textured icosphere: fixed camera, light and a procedural texture (stripes and checks)."""
    verts, faces, face_uvs = icosphere(3)
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 64), indexing="ij")
    checks = ((cols * 8).floor() + (rows * 4).floor()) % 2
    texture = torch.stack([0.5 + 0.4 * torch.sin(8 * torch.pi * cols), 0.5 + 0.4 * torch.cos(6 * torch.pi * rows),
                           0.2 + 0.6 * checks])[None]
    light = torch.tensor([[2.2, 0.4, 0.6, 0.3, 0.1, 0.0, 0.15, 0.0, 0.0]])
    out = render(verts[None], faces, face_uvs, torch.tensor([30.0]), torch.tensor([20.0]), torch.tensor([2.2]),
                 torch.tensor([[0.05, -0.05]]), texture, light, 64, 64)
    return torch.cat([out.rgb[0], out.silhouette[0]]).permute(1, 2, 0)  # (64, 64, 4) RGBA in [0, 1]


def test_reference_image():
    rgba = _reference_scene()
    if os.environ.get("REGENERATE_REFERENCE") == "1":
        REFERENCE_PNG.parent.mkdir(exist_ok=True)
        Image.fromarray((rgba * 255).round().to(torch.uint8).numpy(), "RGBA").save(REFERENCE_PNG)
    reference = torch.from_numpy(np.asarray(Image.open(REFERENCE_PNG).convert("RGBA")).copy()).float() / 255
    assert reference.shape == rgba.shape
    covered = int((rgba[..., 3] == 1).sum())
    assert 1000 < covered < 1300  # a sphere of radius ~18 px, not a blank or saturated image
    torch.testing.assert_close(rgba, reference, atol=1.0 / 255, rtol=0)
