"""The renderer entry the model uses: textured, SH-lit mesh -> RGB image + DIB-R soft silhouette.

Pipeline of the original ``DiffRender.render`` (spec/model-training.md §3.3): world -> camera -> NDC,
camera-space unit face normals, DIB-R rasterization of [coverage, uv, normal], texture lookup, SH
shading, composition over a white or given background, clamp.
"""

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from renderer.camera import FOVY_RAD, camera_transform, perspective_projection, project, world_to_camera
from renderer.mesh import face_normals, gather_faces
from renderer.rasterize import rasterize
from renderer.shading import sample_texture, sh_lighting


@dataclass(frozen=True)
class RenderOutput:
    """What :func:`render` returns; all tensors share the input dtype and device."""

    rgb: Tensor  # (B, 3, H, W) in [0, 1]
    silhouette: Tensor  # (B, 1, H, W) DIB-R soft mask in [0, 1], 1 on covered pixels
    face_normals: Tensor  # (B, F, 3) unit face normals in camera space (0 for degenerate faces)
    face_idx: Tensor  # (B, H, W) int64 visible face per pixel, -1 on the background


def render(
    verts: Tensor,
    faces: Tensor,
    face_uvs: Tensor,
    azimuth_deg: Tensor,
    elevation_deg: Tensor,
    distance: Tensor,
    offset: Tensor,
    texture: Tensor,
    light: Tensor,
    height: int,
    width: int,
    background: Tensor | None = None,
) -> RenderOutput:
    """Render textured, SH-lit meshes with the method's camera; differentiable w.r.t. every tensor.

    The camera is at ``(d·cos e·sin a, d·sin e, d·cos e·cos a)`` looking at ``(offset_x, offset_y, 0)``
    with up = +y and vertical field of view :data:`~renderer.camera.FOVY_RAD`; pixels are square.
    Gradients reach ``verts`` and the camera through the soft silhouette and the interpolated UVs,
    and ``texture``, ``light`` and ``background`` through shading (none flows where the output is
    clamped at 0 or 1).

    Args:
        verts: (B, V, 3) float32/float64 vertices in the object (world) frame.
        faces: (F, 3) int64, outward counter-clockwise (faces turned away are culled).
        face_uvs: (F, 3, 2) per-corner UVs in [0, 1], v up.
        azimuth_deg, elevation_deg: (B,) camera angles in degrees.
        distance: (B,) camera distance from the origin, world units; keep it well above the mesh
            radius (there is no near-plane clipping).
        offset: (B, 2) look-at point (x, y) in the z = 0 plane.
        texture: (B, 3, Ht, Wt) in [0, 1], row 0 at the top (v = 1).
        light: (B, 9) SH coefficients (see :func:`renderer.shading.sh_basis`).
        height, width: output size in pixels (H rows, W columns).
        background: optional (B, 3, H, W) in [0, 1]. None: ``rgb = tex·m·coef + (1 − m)`` (white);
            given: ``rgb = (tex·m + bg·(1 − m))·coef``, with m the hard coverage and coef the SH
            shading (on the background the coefficient at normal 0).

    Returns:
        :class:`RenderOutput`.
    """
    batch = verts.shape[0]
    if verts.ndim != 3 or verts.shape[-1] != 3:
        raise ValueError(f"verts must be (B, V, 3), got {tuple(verts.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3 or face_uvs.shape != (faces.shape[0], 3, 2):
        raise ValueError(
            f"faces must be (F, 3) and face_uvs (F, 3, 2), got {tuple(faces.shape)} and {tuple(face_uvs.shape)}"
        )
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if background is not None and background.shape != (batch, 3, height, width):
        raise ValueError(
            f"background must be (B, 3, H, W) = {(batch, 3, height, width)}, got {tuple(background.shape)}"
        )

    proj = _projection(width / height, verts.dtype, verts.device)
    transform = camera_transform(azimuth_deg, elevation_deg, distance, offset)
    verts_cam = world_to_camera(verts, transform)  # (B, V, 3)
    face_verts_cam = gather_faces(verts_cam, faces)  # (B, F, 3, 3)
    face_verts_image = gather_faces(project(verts_cam, proj), faces)  # (B, F, 3, 2)
    normals = face_normals(face_verts_cam, unit=True)  # (B, F, 3)

    num_faces = faces.shape[0]
    face_features = torch.cat(
        [
            torch.ones(batch, num_faces, 3, 1, dtype=verts.dtype, device=verts.device),
            face_uvs.to(verts.dtype).expand(batch, num_faces, 3, 2),
            normals.unsqueeze(2).expand(batch, num_faces, 3, 3),
        ],
        dim=-1,
    )  # (B, F, 3, 6): coverage, uv, normal
    raster = rasterize(face_verts_image, face_verts_cam[..., 2], face_features, normals[..., 2], height, width)
    coverage, uv, pixel_normals = raster.features.split([1, 2, 3], dim=-1)

    tex = sample_texture(uv, texture)  # (B, H, W, 3)
    coef = sh_lighting(pixel_normals, light).unsqueeze(-1)  # (B, H, W, 1)
    if background is None:
        rgb = tex * coverage * coef + (1.0 - coverage)
    else:
        rgb = (tex * coverage + background.permute(0, 2, 3, 1) * (1.0 - coverage)) * coef
    return RenderOutput(
        rgb=rgb.clamp(0.0, 1.0).permute(0, 3, 1, 2),
        silhouette=raster.soft_mask.unsqueeze(1),
        face_normals=normals,
        face_idx=raster.face_idx,
    )


@functools.lru_cache(maxsize=16)
def _projection(aspect: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Built once per image shape, dtype and device: built per call from Python numbers, it would be a
    # blocking host-to-device copy on every render on a GPU (and could not be captured in a CUDA graph).
    return perspective_projection(FOVY_RAD, aspect, dtype=dtype, device=device)
