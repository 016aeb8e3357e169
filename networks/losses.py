"""Loss terms as pure functions of tensors (model-training.md §5).

Each function returns an unweighted scalar; the training loop applies the ``lambda_*`` weights in one
place. Shapes: B batch, V vertices, F faces, E edges, H x W image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from networks.attributes import Attributes
from renderer.shading import mask_iou_loss

# Target depth magnitude of the depthR / depthC regularisers: vertices are pulled to z = ±0.001.
_DEPTH_TARGET = 1e-3


def _check_mask(name: str, mask: Tensor) -> None:
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"{name} must be a (B,1,H,W) mask, got {tuple(mask.shape)}")


def masked_image_l1(pred_rgb: Tensor, target_rgb: Tensor, mask: Tensor) -> Tensor:
    """Mean |P − G| where both images are composited on white with the ground-truth mask.

    Args:
        pred_rgb, target_rgb: (B, 3, H, W) in [0, 1].
        mask: (B, 1, H, W) ground-truth mask in [0, 1]; pixels outside it get no gradient.

    Returns:
        () mean over B·3·H·W.
    """
    white = 1 - mask
    return ((pred_rgb * mask + white) - (target_rgb * mask + white)).abs().mean()


def contour_loss(pred_mask: Tensor, target_mask: Tensor) -> Tensor:
    """Mean squared difference of the masks' contour maps ``c(M) = |M − up(down(M))|``.

    down/up are nearest-neighbour resizes to (H//4, W//4) and back.

    Args:
        pred_mask, target_mask: (B, 1, H, W) in [0, 1].

    Returns:
        () scalar.
    """

    def contour(m: Tensor) -> Tensor:
        h, w = m.shape[-2:]
        coarse = F.interpolate(m, size=(h // 4, w // 4), mode="nearest")
        return (m - F.interpolate(coarse, size=(h, w), mode="nearest")).abs()

    return (contour(pred_mask) - contour(target_mask)).pow(2).mean()


def data_loss(pred_rgb: Tensor, pred_silhouette: Tensor, target_rgb: Tensor, target_mask: Tensor,
              contour_weight: float = 0.0) -> tuple[Tensor, Tensor]:
    """Reconstruction terms of a rendered batch against the input batch (§5.1).

    Args:
        pred_rgb: (B, 3, H, W) render in [0, 1].
        pred_silhouette: (B, 1, H, W) soft silhouette in [0, 1].
        target_rgb: (B, 3, H, W) input RGB in [0, 1].
        target_mask: (B, 1, H, W) input mask in {0, 1}.
        contour_weight: weight of :func:`contour_loss` inside the mask term.

    Returns:
        (image term, mask term): :func:`masked_image_l1`, and the soft-IoU loss
        ``1 − mean_b IoU_b`` plus ``contour_weight`` times the contour loss. The original's data
        loss is ``image_weight · image + mask``.
    """
    _check_mask("pred_silhouette", pred_silhouette)
    _check_mask("target_mask", target_mask)
    image = masked_image_l1(pred_rgb, target_rgb, target_mask)
    mask = mask_iou_loss(pred_silhouette[:, 0], target_mask[:, 0])
    if contour_weight > 0:
        mask = mask + contour_weight * contour_loss(pred_silhouette, target_mask)
    return image, mask


def laplacian_loss(delta_verts: Tensor, laplacian: Tensor) -> Tensor:
    """Smoothness of the offsets: ``(1/B) Σ_b Σ_v ‖(L Δ_b)_v‖²``.

    Args:
        delta_verts: (B, V, 3) offsets.
        laplacian: (V, V) uniform Laplacian (``(L x)_i`` = neighbour mean − x_i).
    """
    return torch.matmul(laplacian.to(delta_verts.dtype), delta_verts).pow(2).sum() / delta_verts.shape[0]


def flatness_loss(face_normals: Tensor, edge_faces: Tensor) -> Tensor:
    """Flatness across edges: ``(1/B) Σ_b Σ_e (n1·n2 − 1)²`` for the two faces of each edge.

    Args:
        face_normals: (B, F, 3) unit face normals (any frame: the cosine does not depend on it).
        edge_faces: (E, 2) int64, the two faces sharing each edge.
    """
    cos = (face_normals[:, edge_faces[:, 0]] * face_normals[:, edge_faces[:, 1]]).sum(dim=-1)  # (B,E)
    return (cos - 1).pow(2).sum() / face_normals.shape[0]


def edge_length_loss(verts: Tensor, edges: Tensor) -> Tensor:
    """Uniformity of edge lengths: ``0.1 · mean_b ‖ℓ_b − mean(ℓ_b)‖₂`` over the E edges of sample b.

    The factor 0.1 is the original's, kept inside the term so that ``--lambda_edge`` means the same.

    Args:
        verts: (B, V, 3) absolute vertices.
        edges: (E, 2) int64 vertex pairs.
    """
    lengths = (verts[:, edges[:, 0]] - verts[:, edges[:, 1]]).norm(dim=-1)        # (B,E)
    return 0.1 * (lengths - lengths.mean(dim=1, keepdim=True)).norm(dim=1).mean()


def deform_loss(delta_verts: Tensor) -> Tensor:
    """Mean offset length ``mean_{b,v} ‖Δ_{b,v}‖₂``; delta_verts (B, V, 3)."""
    return delta_verts.norm(dim=-1).mean()


def depth_loss(verts: Tensor) -> Tensor:
    """Mean squared depth ``mean z²`` of the absolute vertices (B, V, 3)."""
    return verts[..., 2].pow(2).mean()


def depth_weighted_loss(verts: Tensor, sign_init: Tensor, ratio: float, kind: str,
                        temperature: float = 2.0) -> Tensor:
    """Pull each vertex's depth to ±0.001 (the side of the initial template), harder off-centre.

    ``mean_{b,v} (z − s_v·0.001)² · w(x, y)`` with s_v = +1 where sign_init ≥ 0 else −1, x and y
    detached, r² = x² + (y/ratio)², and w = exp(temperature·r²) (``kind='exp'``, depthR) or r²
    (``kind='quadratic'``, depthC).

    Args:
        verts: (B, V, 3) absolute vertices.
        sign_init: (V,) sign of the initial template's z (-1, 0 or +1).
        ratio: image height / width.
        kind: 'exp' or 'quadratic'.
        temperature: exponent scale of the 'exp' weight.
    """
    if kind not in ("exp", "quadratic"):
        raise ValueError(f"kind must be 'exp' or 'quadratic', got {kind!r}")
    x, y, z = verts[..., 0].detach(), verts[..., 1].detach(), verts[..., 2]
    side = torch.where(sign_init >= 0, 1.0, -1.0).to(z.dtype)
    r2 = x.pow(2) + (y / ratio).pow(2)
    weight = torch.exp(temperature * r2) if kind == "exp" else r2
    return ((z - side * _DEPTH_TARGET).pow(2) * weight).mean()


def flip_loss(delta_verts: Tensor, flip_index: Tensor, sign_init: Tensor, l1: bool = False) -> Tensor:
    """Front/back symmetry of the offsets through the z = 0 plane (§5.4).

    Each vertex's offset is compared with its mirror partner's offset with z negated; the distance
    counts only where the partner's offset points to the same side as the partner's initial
    template vertex (``relu(sign(Δ_z)·sign_init)`` of the partner).

    Args:
        delta_verts: (B, V, 3) offsets.
        flip_index: (V,) int64 mirror partner of each vertex.
        sign_init: (V,) sign of the initial template's z.
        l1: per-coordinate absolute difference instead of the per-vertex Euclidean distance.

    Returns:
        () mean over B·V (B·V·3 with ``l1``).
    """
    partner = delta_verts[:, flip_index]
    mirrored = torch.cat([partner[..., :2], -partner[..., 2:]], dim=-1)  # z negated, no constant to upload
    same_side = torch.relu(torch.sign(delta_verts[..., 2]) * sign_init.to(delta_verts.dtype))  # (B,V)
    weight = same_side[:, flip_index]
    diff = delta_verts - mirrored
    if l1:
        return (diff.abs() * weight.unsqueeze(-1)).mean()
    return (diff.norm(dim=-1) * weight).mean()


def _nearest_squared_distance(source: Tensor, target: Tensor) -> Tensor:
    """(B, N, 3), (B, M, 3) -> (B, N) squared distance of each source point to its nearest target."""
    # The matrix-product form of cdist is ~25x faster on a GPU; it only picks the neighbour (a near-tie
    # may go either way), the distance itself is recomputed exactly below.
    with torch.no_grad():
        nearest = torch.cdist(source, target, compute_mode="use_mm_for_euclid_dist").argmin(dim=-1)
    matched = torch.gather(target, 1, nearest.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    return (source - matched).pow(2).sum(dim=-1)


def chamfer_distance(x: Tensor, y: Tensor, per_sample: bool = False) -> Tensor:
    """Symmetric Chamfer distance with squared distances (pytorch3d's default reduction).

    ``mean_i min_j ‖x_i − y_j‖² + mean_j min_i ‖y_j − x_i‖²`` per sample, then the mean over the batch.

    Args:
        x: (B, N, 3) points.
        y: (B, M, 3) points.
        per_sample: return the (B,) per-sample values instead of their mean.
    """
    distance = _nearest_squared_distance(x, y).mean(dim=1) + _nearest_squared_distance(y, x).mean(dim=1)
    return distance if per_sample else distance.mean()


def angle_xy(angle_deg: Tensor) -> Tensor:
    """(B,) angles in degrees -> (B, 2) (cos, sin): a distance between these ignores the 360-degree wrap."""
    radians = torch.deg2rad(angle_deg)
    return torch.stack([torch.cos(radians), torch.sin(radians)], dim=1)  # (B,2)


def azimuth_spread_loss(azimuth_deg: Tensor, harmonics: int = 2) -> Tensor:
    """How far a batch of predicted azimuths is from covering the circle evenly.

    ``sum_k ‖mean_b (cos k·a_b, sin k·a_b)‖²`` for k = 1..harmonics: zero for evenly spread azimuths,
    ``harmonics`` when all are equal. Penalises the camera collapsing onto one view (or two opposite
    ones, k = 2), which lets the shape encoder fit every silhouette from the wrong side. Only for data
    whose azimuths are spread round the circle (not an option of the original).

    Args:
        azimuth_deg: (B,) predicted azimuths in degrees.
        harmonics: number of Fourier harmonics matched to the uniform distribution's (all zero).
    """
    return sum(angle_xy(k * azimuth_deg).mean(dim=0).pow(2).sum() for k in range(1, harmonics + 1))


def attribute_cycle_loss(pred: Attributes, target: Attributes, azim_weight: float = 1.0, l1: bool = False,
                         chamfer: bool = True) -> Tensor:
    """Attributes re-encoded from a render against the attributes it was rendered from (§5.5).

    ``azim_weight·d(ang(azimuth)) + d(ang(elevation)) + d(distance) + shape + d(texture)
    + 0.1·d(light) + d(offset)``, with ang(θ) = (cos θ, sin θ), d the mean absolute (``l1``) or mean
    squared difference, and shape the :func:`chamfer_distance` of the absolute vertices (or d of
    the vertices without ``chamfer``). The background is not compared; ``target`` is detached.

    Args:
        pred: attributes predicted from the render.
        target: the rendered attributes.
    """
    target = target.detach()
    d: Callable[[Tensor, Tensor], Tensor] = (
        (lambda a, b: (a - b).abs().mean()) if l1 else (lambda a, b: (a - b).pow(2).mean()))
    camera = (azim_weight * d(angle_xy(pred.azimuth_deg), angle_xy(target.azimuth_deg))
              + d(angle_xy(pred.elevation_deg), angle_xy(target.elevation_deg))
              + d(pred.distance, target.distance))
    shape = chamfer_distance(pred.verts, target.verts) if chamfer else d(pred.verts, target.verts)
    return (camera + shape + d(pred.texture, target.texture) + 0.1 * d(pred.light, target.light)
            + d(pred.offset, target.offset))


def gradient_penalty(critic: Callable[[Tensor], Tensor | Sequence[Tensor]], real: Tensor, fake: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
    """WGAN-GP penalty ``mean_b (‖∇ D(x̂_b)‖₂ − 1)²`` at x̂ = α·real + (1 − α)·fake, α ~ U[0, 1) per sample.

    The penalty is differentiable with respect to the critic's parameters (``create_graph``). A critic
    returning several outputs (multi-scale) is penalised per output and the penalties summed.

    Args:
        critic: module mapping (B, C, H, W) -> scores.
        real, fake: (B, C, H, W) batches (treated as constants).
        generator: torch RNG for α (device of ``real``); the global torch RNG when None.
    """
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=generator, device=real.device, dtype=real.dtype)
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    scores = critic(mixed)
    outputs = scores if isinstance(scores, (list, tuple)) else [scores]
    penalty = mixed.new_zeros(())
    for out in outputs:
        (grad,) = torch.autograd.grad(out.sum(), mixed, create_graph=True)
        penalty = penalty + (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
    return penalty


def wgan_critic_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """Critic side of the Wasserstein loss: ``mean D(fake) − mean D(real)`` (scores (B, 1))."""
    return fake_scores.mean() - real_scores.mean()


def wgan_generator_loss(fake_scores: Tensor) -> Tensor:
    """Encoder side of the Wasserstein loss: ``−mean D(fake)`` (scores (B, 1))."""
    return -fake_scores.mean()


def lsgan_critic_loss(real_maps: Sequence[Tensor], fake_maps: Sequence[Tensor]) -> Tensor:
    """Least-squares critic loss summed over scales: ``Σ_s mean (D_s(real) − 1)² + mean D_s(fake)²``."""
    return sum((r - 1).pow(2).mean() + f.pow(2).mean() for r, f in zip(real_maps, fake_maps, strict=True))


def lsgan_generator_loss(fake_maps: Sequence[Tensor]) -> Tensor:
    """Least-squares encoder loss summed over scales: ``Σ_s mean (D_s(fake) − 1)²``."""
    return sum((f - 1).pow(2).mean() for f in fake_maps)
