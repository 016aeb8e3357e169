"""Camera math: perspective projection, look-at transforms and spherical camera positions.

This is the only module of the project that does camera geometry; everything else imports from here.

Conventions (Kaolin v0.12 legacy camera, see spec/renderer-math.md §1):

* World and camera space are right-handed with y up. The camera looks down its own −z axis, so
  visible points have camera z < 0 and a larger z is nearer.
* A camera transform is a (B, 4, 3) matrix ``[R; t]`` applied to row vectors,
  ``P_cam = P_world @ R + t``: the columns of R are the camera axes in world coordinates and
  ``t = −C @ R`` for the camera centre C.
* Projection is a 3-vector ``p = (1/(aspect·tan(fovy/2)), 1/tan(fovy/2), −1)`` with aspect = W/H.
  NDC is ``(p0·x/(p2·z), p1·y/(p2·z))``: x right, y up, [−1, 1] over the image.
* Angles are in degrees, distances in world units.
"""

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

FOVY_RAD: float = 2.0 * math.atan(1.0 / 2.5)
"""Vertical field of view of the method's camera in radians (≈ 43.6°); tan(FOVY_RAD / 2) = 0.4."""


def perspective_projection(
    fovy_rad: float, aspect: float, dtype: torch.dtype = torch.float32, device=None
) -> Tensor:
    """Kaolin's perspective projection vector.

    Args:
        fovy_rad: vertical field of view in radians, in (0, π).
        aspect: image width / height (W/H); pixels are square in camera space with this choice.
        dtype, device: of the returned tensor.

    Returns:
        (3,) tensor ``[1/(aspect·t), 1/t, −1]`` with ``t = tan(fovy_rad / 2)``.
    """
    if not 0.0 < fovy_rad < math.pi:
        raise ValueError(f"fovy_rad must be in (0, pi) radians, got {fovy_rad}")
    if aspect <= 0.0:
        raise ValueError(f"aspect must be width / height > 0, got {aspect}")
    t = math.tan(fovy_rad / 2.0)
    return torch.tensor([1.0 / (aspect * t), 1.0 / t, -1.0], dtype=dtype, device=device)


def camera_position(distance: Tensor, elevation_deg: Tensor, azimuth_deg: Tensor) -> Tensor:
    """Camera centre on a sphere around the world origin.

    Args:
        distance: (B,) distance from the origin, world units.
        elevation_deg: (B,) elevation above the x-z plane, degrees.
        azimuth_deg: (B,) azimuth around +y, degrees; 0 puts the camera on +z.

    Returns:
        (B, 3) ``(d·cos e·sin a, d·sin e, d·cos e·cos a)``, dtype of the inputs.
    """
    elevation = torch.deg2rad(elevation_deg)
    azimuth = torch.deg2rad(azimuth_deg)
    return torch.stack(
        [
            distance * torch.cos(elevation) * torch.sin(azimuth),
            distance * torch.sin(elevation),
            distance * torch.cos(elevation) * torch.cos(azimuth),
        ],
        dim=-1,
    )


def look_at(eye: Tensor, at: Tensor, up: Sequence[float] = (0.0, 1.0, 0.0)) -> Tensor:
    """Kaolin's legacy look-at transform.

    Camera axes: ``z_c = normalize(eye − at)``, ``x_c = normalize(up × z_c)``, ``y_c = z_c × x_c``
    (already unit because z_c ⊥ x_c; not re-normalised, as in Kaolin). Undefined (NaN) when
    ``eye − at`` is parallel to ``up``, e.g. at elevation ±90°.

    Args:
        eye: (B, 3) camera centres, world units.
        at: (B, 3) points the cameras look at.
        up: world up direction, 3 floats.

    Returns:
        (B, 4, 3) transform ``[R; −eye @ R]`` for row vectors, R with the camera axes as columns.
    """
    if eye.shape != at.shape or eye.ndim != 2 or eye.shape[-1] != 3:
        raise ValueError(f"eye and at must both be (B, 3), got {tuple(eye.shape)} and {tuple(at.shape)}")
    up_dir = _direction(tuple(up), eye.dtype, eye.device).expand_as(eye)
    z_axis = eye - at
    z_axis = z_axis / torch.linalg.vector_norm(z_axis, dim=-1, keepdim=True)
    x_axis = torch.linalg.cross(up_dir, z_axis, dim=-1)
    x_axis = x_axis / torch.linalg.vector_norm(x_axis, dim=-1, keepdim=True)
    y_axis = torch.linalg.cross(z_axis, x_axis, dim=-1)
    rotation = torch.stack([x_axis, y_axis, z_axis], dim=-1)  # (B, 3, 3), axes as columns
    translation = -eye.unsqueeze(1) @ rotation  # (B, 1, 3)
    return torch.cat([rotation, translation], dim=1)


@functools.lru_cache(maxsize=16)
def _direction(xyz: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    # One tensor per direction, dtype and device: made from Python numbers on every call, it would be a
    # blocking host-to-device copy per render on a GPU (and could not be captured in a CUDA graph).
    return torch.tensor(xyz, dtype=dtype, device=device)


def camera_transform(
    azimuth_deg: Tensor, elevation_deg: Tensor, distance: Tensor, offset: Tensor
) -> Tensor:
    """The method's camera: on a sphere around the origin, looking at ``(offset_x, offset_y, 0)``.

    The camera sits on a sphere around the world origin, not around the look-at point, so the offset
    also tilts the viewing direction slightly (as in the original).

    Args:
        azimuth_deg, elevation_deg: (B,) degrees.
        distance: (B,) world units.
        offset: (B, 2) look-at point (x, y) in the z = 0 plane, world units.

    Returns:
        (B, 4, 3) world-to-camera transform (see :func:`look_at`).
    """
    if offset.ndim != 2 or offset.shape[-1] != 2:
        raise ValueError(f"offset must be (B, 2), got {tuple(offset.shape)}")
    eye = camera_position(distance, elevation_deg, azimuth_deg)
    at = torch.cat([offset, torch.zeros_like(offset[:, :1])], dim=-1)
    return look_at(eye, at)


def world_to_camera(verts: Tensor, transform: Tensor) -> Tensor:
    """Apply a (B, 4, 3) camera transform: ``[verts, 1] @ transform``.

    Args:
        verts: (B, V, 3) world-space points.
        transform: (B, 4, 3) from :func:`look_at` / :func:`camera_transform`.

    Returns:
        (B, V, 3) camera-space points (visible ones have z < 0).
    """
    return verts @ transform[:, :3] + transform[:, 3:]


def camera_to_world(verts_cam: Tensor, transform: Tensor) -> Tensor:
    """Inverse of :func:`world_to_camera` for look-at transforms (R orthonormal, so R⁻¹ = Rᵀ).

    Args:
        verts_cam: (B, V, 3) camera-space points.
        transform: (B, 4, 3) look-at transform.

    Returns:
        (B, V, 3) world-space points.
    """
    rotation_t = transform[:, :3].transpose(1, 2)
    return (verts_cam - transform[:, 3:]) @ rotation_t


def project(verts_cam: Tensor, proj: Tensor) -> Tensor:
    """Perspective divide to NDC, exactly as Kaolin's ``prepare_vertices``.

    No clipping or near plane: points at z = 0 give inf/NaN and points behind the camera (z > 0) are
    mirrored; keep the camera well away from the mesh.

    Args:
        verts_cam: (B, V, 3) camera-space points.
        proj: (3,) projection vector from :func:`perspective_projection`.

    Returns:
        (B, V, 2) NDC ``(p0·x/(p2·z), p1·y/(p2·z))``, x right, y up.
    """
    return verts_cam[..., :2] * proj[:2] / (verts_cam[..., 2:] * proj[2])


def unproject(verts_ndc: Tensor, depth: Tensor, proj: Tensor) -> Tensor:
    """Inverse of :func:`project` given the camera-space z of each point.

    Args:
        verts_ndc: (B, V, 2) NDC coordinates.
        depth: (B, V) camera-space z (negative in front of the camera).
        proj: (3,) projection vector from :func:`perspective_projection`.

    Returns:
        (B, V, 3) camera-space points.
    """
    xy = verts_ndc * (depth.unsqueeze(-1) * proj[2]) / proj[:2]
    return torch.cat([xy, depth.unsqueeze(-1)], dim=-1)
