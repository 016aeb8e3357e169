"""Per-pixel shading and the silhouette metric: texture lookup, spherical-harmonic light, soft mask IoU.

All three follow Kaolin v0.12 exactly (spec/renderer-math.md §4.1–§4.3).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

# Real SH basis constants in Kaolin's slot order: 1, x, z, y, xy, yz, 3z²−1, xz, x²−y². Slots 7 and 8
# are the textbook constants divided by √2; kept as is because trained lights depend on them.
_SH_C0 = 0.28209479177
_SH_C1 = 0.4886025119
_SH_C2_XY_YZ = 1.09254843059
_SH_C2_ZZ = 0.94617469575
_SH_C2_ZZ_OFFSET = 0.31539156525
_SH_C2_XZ = 0.77254840404
_SH_C2_XX_YY = 0.38627420202

# Keeps IoU finite for two empty masks (Kaolin's value).
_IOU_EPS = 1e-10


def sample_texture(uv: Tensor, texture: Tensor) -> Tensor:
    """Bilinear texture lookup (Kaolin's ``texture_mapping``).

    UVs are clamped to [0, 1] (no wrap; the clamp stops the uv gradient outside), u = 0 is the left
    edge of the image and v = 0 its bottom edge. Texel centres are at ((k + 0.5)/Wt, 1 − (r + 0.5)/Ht)
    for column k, row r (align_corners=False); within half a texel of an edge the border texel is used.

    Args:
        uv: (B, H, W, 2) texture coordinates (u, v).
        texture: (B, C, Ht, Wt) texture images, row 0 at the top.

    Returns:
        (B, H, W, C) sampled values, dtype of ``texture``; differentiable w.r.t. both inputs.
    """
    if uv.ndim != 4 or uv.shape[-1] != 2:
        raise ValueError(f"uv must be (B, H, W, 2), got {tuple(uv.shape)}")
    if texture.ndim != 4 or texture.shape[0] != uv.shape[0]:
        raise ValueError(f"texture must be (B, C, Ht, Wt) with B = {uv.shape[0]}, got {tuple(texture.shape)}")
    uv = uv.clamp(0.0, 1.0)
    grid = torch.stack([2.0 * uv[..., 0] - 1.0, 1.0 - 2.0 * uv[..., 1]], dim=-1)
    sampled = F.grid_sample(texture, grid.to(texture.dtype), mode="bilinear", padding_mode="border",
                            align_corners=False)
    return sampled.permute(0, 2, 3, 1)


def sh_basis(normals: Tensor) -> Tensor:
    """The 9 second-order SH basis values in Kaolin's order and constants.

    Args:
        normals: (..., 3) directions (x, y, z); not normalised here (0 gives the background value).

    Returns:
        (..., 9) basis values.
    """
    x, y, z = normals.unbind(dim=-1)
    return torch.stack(
        [
            torch.full_like(x, _SH_C0),
            _SH_C1 * x,
            _SH_C1 * z,
            _SH_C1 * y,
            _SH_C2_XY_YZ * x * y,
            _SH_C2_XY_YZ * y * z,
            _SH_C2_ZZ * z * z - _SH_C2_ZZ_OFFSET,
            _SH_C2_XZ * x * z,
            _SH_C2_XX_YY * (x * x - y * y),
        ],
        dim=-1,
    )


def sh_lighting(normals: Tensor, light: Tensor) -> Tensor:
    """Spherical-harmonic shading coefficient ``Σ_k light_k · Y_k(normal)`` (no clamp).

    Args:
        normals: (B, H, W, 3) per-pixel normals in camera space; 0 on the background.
        light: (B, 9) SH coefficients in the slot order of :func:`sh_basis`.

    Returns:
        (B, H, W) shading coefficient, unbounded (1 for a white ambient light on the object).
    """
    if light.ndim != 2 or light.shape[-1] != 9 or light.shape[0] != normals.shape[0]:
        raise ValueError(f"light must be (B, 9) with B = {normals.shape[0]}, got {tuple(light.shape)}")
    basis = sh_basis(normals)
    return (basis * light.view(light.shape[0], *([1] * (basis.ndim - 2)), 9)).sum(dim=-1)


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample soft IoU, ``Σ p·t / (Σ (p + t − p·t) + 1e-10)`` over the pixels.

    Args:
        pred, target: (B, H, W) masks in [0, 1].

    Returns:
        (B,) IoU in [0, 1].
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target masks differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    intersection = (pred * target).flatten(1).sum(dim=1)
    union = (pred + target - pred * target).flatten(1).sum(dim=1)
    return intersection / (union + _IOU_EPS)


def mask_iou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Kaolin's ``mask_iou`` loss: ``1 − mean_b IoU_b`` (see :func:`mask_iou`).

    Args:
        pred, target: (B, H, W) masks in [0, 1].

    Returns:
        () scalar loss in [0, 1].
    """
    return 1.0 - mask_iou(pred, target).mean()
