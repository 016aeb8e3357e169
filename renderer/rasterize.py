"""DIB-R rasterization with the semantics of Kaolin v0.12 `dibr_rasterization` (spec/renderer-math.md §2-§3).

`rasterize` is the one public entry: it takes the Triton fast path for CUDA tensors where
`renderer/rasterize_triton.py` exists, and the plain-PyTorch reference `rasterize_reference` otherwise.

The reference never loops over all pixels x all faces. It enumerates (pixel, face) pairs from each face's
bounding box (a conservative integer pixel range, then Kaolin's exact float comparisons), in chunks of at
most `_PAIRS_PER_CHUNK` pairs, so time and memory grow with the summed box areas (spec §5.3):

* hard pass (no autograd): coverage, nearest face by z (strict-greater update: the lowest index wins
  ties), barycentric weights of the winner;
* features: `_InterpolateFeatures`, whose backward is the closed form of §3.1 (the winning face's
  barycentrics recomputed at the fixed pixel centre);
* soft mask: `_SoftMask`, first `knum` faces by index whose enlarged box holds an uncovered pixel (faces
  whose whole box is covered are skipped with a summed-area table of the uncovered pixels), the
  six-candidate squared distance, S = 1 - prod(1 - P); it keeps only the candidates with P > 0
  (pixel, face, nearest-feature type, dS/d(d^2)) for the closed-form backward of §3.2, not Kaolin's
  390 B/px buffer.

Like Kaolin, both stages work on coordinates scaled by `MULTIPLIER` = 1000 with float32 pixel centres
(1000/W)(2j+1-W), so that pixels lying exactly on edges are decided the same way.

One deliberate difference: a face with a non-finite image coordinate or depth (a vertex at or behind the
camera plane) is ignored by both stages, where Kaolin's comparisons with NaN would let it cover pixels.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

MULTIPLIER = 1000.0  # Kaolin's internal scale of NDC coordinates; it only changes rounding
AREA_EPS = 1e-8  # added with the sign of the doubled area: scaled units (forward), NDC (backward)
DIST_EPS = 1e-7  # Kaolin's tiny term in the soft-mask denominators (scaled units)
FAR_SQ_NDC = 4.0  # squared distance used for an edge whose perpendicular foot is off the segment
_RANGE_SLACK = 1e-3  # pixels: widens the integer ranges so rounding can never drop a pixel
_PAIRS_PER_CHUNK = 1 << 20  # bounds the temporaries: roughly 150 bytes per pair in float32


@dataclass(frozen=True)
class Rasterized:
    """Output of `rasterize`. B batch, H rows (row 0 at the top, NDC y = +1), W columns, D channels.

    features: (B, H, W, D) features interpolated with screen-space barycentrics of the nearest face;
        0 on background. Differentiable w.r.t. face_verts_image and face_features.
    soft_mask: (B, H, W) DIB-R soft silhouette in [0, 1]; exactly 1 on covered pixels. Differentiable
        w.r.t. face_verts_image (uncovered pixels only).
    face_idx: (B, H, W) int64 index of the winning face in [0, F), -1 on background.
    """

    features: Tensor
    soft_mask: Tensor
    face_idx: Tensor


def rasterize(
    face_verts_image: Tensor,
    face_verts_z: Tensor,
    face_features: Tensor,
    face_normals_z: Tensor,
    height: int,
    width: int,
    sigma_inv: float = 7000.0,
    box_len: float = 0.02,
    knum: int = 30,
) -> Rasterized:
    """DIB-R rasterization (Kaolin v0.12 `dibr_rasterization`); see `rasterize_reference` for the arguments.

    CUDA tensors go to the Triton fast path when `renderer/rasterize_triton.py` is present; everything
    else (and CUDA without it) runs the plain-PyTorch reference.
    """
    if face_verts_image.is_cuda:
        fast_path = _triton_rasterize()
        if fast_path is not None:
            return fast_path(
                face_verts_image, face_verts_z, face_features, face_normals_z, height, width,
                sigma_inv, box_len, knum,
            )
    return rasterize_reference(
        face_verts_image, face_verts_z, face_features, face_normals_z, height, width, sigma_inv, box_len, knum
    )


@functools.cache
def _triton_rasterize() -> Callable[..., Rasterized] | None:
    """`renderer.rasterize_triton.rasterize_triton` (same signature as `rasterize`), or None where that
    module or Triton itself is absent."""
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("renderer.rasterize_triton") is None:
        return None
    from renderer.rasterize_triton import rasterize_triton

    return rasterize_triton


def rasterize_reference(
    face_verts_image: Tensor,
    face_verts_z: Tensor,
    face_features: Tensor,
    face_normals_z: Tensor,
    height: int,
    width: int,
    sigma_inv: float = 7000.0,
    box_len: float = 0.02,
    knum: int = 30,
) -> Rasterized:
    """Plain-PyTorch DIB-R rasterizer, exact to Kaolin v0.12 (spec/renderer-math.md §2-§3); any device.

    Args:
        face_verts_image: (B, F, 3, 2) float32/float64 NDC positions of each face's corners, x right and
            y up, the image spanning [-1, 1] on both axes.
        face_verts_z: (B, F, 3) same dtype, camera-space z of the corners (visible < 0, larger = nearer).
            Used only to pick the nearest face; it receives no gradient.
        face_features: (B, F, 3, D) same dtype, per-corner features to interpolate (D may be 0).
        face_normals_z: (B, F) camera-space z of the unit face normals. Faces with a value < 0 are culled
            from the hard pass (exactly 0 is kept); the soft mask uses all faces. No gradient.
        height, width: output size H, W in pixels (H != W allowed). Pixel (i, j) samples the NDC point
            ((2j + 1 - W) / W, (H - 2i - 1) / H).
        sigma_inv: soft-mask sharpness 1/sigma, in 1/NDC^2: P = exp(-sigma_inv * d^2).
        box_len: margin in NDC added on every side of a face's box to find its soft-mask pixels.
        knum: at most this many faces (the first ones by index) contribute to a pixel's soft mask.

    Returns:
        `Rasterized` (features (B, H, W, D), soft_mask (B, H, W), face_idx (B, H, W) int64), in the
        input dtype and device. Gradients reach face_verts_image (through the features and the soft
        mask) and face_features only.

    Cost: time and memory grow with the summed box areas, not with H*W*F; the temporaries are bounded by
    `_PAIRS_PER_CHUNK` pairs per step. Peak memory for B = 48, 128 x 128, the 1280-face icosphere seen
    by bench/render.py's cameras (float32, forward + backward, outputs and saved tensors included):
    106 MiB on CUDA for this function alone (134 MiB for the whole `render`), where Kaolin's
    per-pixel candidate buffer alone takes 390 B/px, i.e. 293 MiB.
    """
    check_inputs(face_verts_image, face_verts_z, face_features, face_normals_z, height, width,
                 sigma_inv, box_len, knum)
    batch, num_faces = face_normals_z.shape
    height, width = int(height), int(width)
    dtype, device = face_verts_image.dtype, face_verts_image.device
    xs, ys = _pixel_centres(height, width, dtype, device)
    grid = _Grid(height, width, num_faces, xs, ys)

    with torch.no_grad():
        verts = face_verts_image.detach() * MULTIPLIER
        finite = verts.isfinite().flatten(2).all(2) & face_verts_z.detach().isfinite().all(2)
        win_pix, win_face, win_weights = _nearest_faces(verts, face_verts_z.detach(),
                                                        finite & (face_normals_z >= 0), grid)
        face_idx = torch.full((batch * height * width,), -1, dtype=torch.long, device=device)
        face_idx[win_pix] = win_face % num_faces

    features = _InterpolateFeatures.apply(face_verts_image, face_features, win_pix, win_face,
                                          win_weights, grid)
    soft_mask = _SoftMask.apply(face_verts_image, face_idx, finite, grid, float(sigma_inv),
                                float(box_len), int(knum))
    return Rasterized(
        features=features.reshape(batch, height, width, face_features.shape[-1]),
        soft_mask=soft_mask.reshape(batch, height, width),
        face_idx=face_idx.reshape(batch, height, width),
    )


def check_inputs(face_verts_image, face_verts_z, face_features, face_normals_z, height, width,
                 sigma_inv, box_len, knum) -> None:
    """Raise ValueError/TypeError with a fix for inputs that do not follow the documented contract."""
    if face_verts_image.dim() != 4 or face_verts_image.shape[2:] != (3, 2):
        raise ValueError(f"face_verts_image must be (B, F, 3, 2), got {tuple(face_verts_image.shape)}")
    batch, num_faces = face_verts_image.shape[:2]
    if face_verts_z.shape != (batch, num_faces, 3):
        raise ValueError(f"face_verts_z must be (B, F, 3) = {(batch, num_faces, 3)}, "
                         f"got {tuple(face_verts_z.shape)}")
    if face_features.dim() != 4 or face_features.shape[:3] != (batch, num_faces, 3):
        raise ValueError(f"face_features must be (B, F, 3, D) with (B, F) = {(batch, num_faces)}, "
                         f"got {tuple(face_features.shape)}")
    if face_normals_z.shape != (batch, num_faces):
        raise ValueError(f"face_normals_z must be (B, F) = {(batch, num_faces)}, "
                         f"got {tuple(face_normals_z.shape)}")
    if face_verts_image.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"face_verts_image must be float32 or float64, got {face_verts_image.dtype}")
    for name, tensor in (("face_verts_z", face_verts_z), ("face_features", face_features)):
        if tensor.dtype != face_verts_image.dtype:
            raise TypeError(f"{name} is {tensor.dtype} but face_verts_image is {face_verts_image.dtype}; "
                            "cast them to one dtype")
    if not face_normals_z.is_floating_point():
        raise TypeError(f"face_normals_z must be a floating tensor, got {face_normals_z.dtype}")
    for name, tensor in (("face_verts_z", face_verts_z), ("face_features", face_features),
                         ("face_normals_z", face_normals_z)):
        if tensor.device != face_verts_image.device:
            raise ValueError(f"{name} is on {tensor.device} but face_verts_image is on "
                             f"{face_verts_image.device}; move them to one device")
    if int(height) != height or int(width) != width or height < 1 or width < 1:
        raise ValueError(f"height and width must be positive integers, got {height} x {width}")
    if not sigma_inv > 0 or not box_len >= 0:
        raise ValueError(f"sigma_inv must be > 0 and box_len >= 0, got {sigma_inv} and {box_len}")
    if int(knum) != knum or knum < 1:
        raise ValueError(f"knum must be a positive integer, got {knum}")


@dataclass(frozen=True)
class _Grid:
    """Image geometry shared by the passes: sizes and the scaled pixel centres xs (W,), ys (H,)."""

    height: int
    width: int
    num_faces: int
    xs: Tensor
    ys: Tensor

    def centres(self, pix: Tensor) -> Tensor:
        """(N,) flat pixel indices b*H*W + i*W + j -> (N, 2) scaled centre coordinates (x, y)."""
        col = pix % self.width
        row = torch.div(pix, self.width, rounding_mode="floor") % self.height
        return torch.stack((self.xs[col], self.ys[row]), dim=-1)


def _pixel_centres(height: int, width: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """Scaled pixel centres x (W,) and y (H,), rounded to float32 like Kaolin's kernels, then cast."""
    scale = torch.tensor(MULTIPLIER, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    rows = torch.arange(height, dtype=torch.float32, device=device)
    xs = (scale / width) * (2 * cols + 1 - width)
    ys = (scale / height) * (height - 2 * rows - 1)
    return xs.to(dtype), ys.to(dtype)


def _pixel_ranges(box_lo: Tensor, box_hi: Tensor, grid: _Grid) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Integer pixel ranges holding every pixel centre that may pass the exact box test.

    box_lo, box_hi: (N, 2) scaled (x, y) box corners. Returns row0, col0, nrows, ncols, each (N,) int64,
    clipped to the image (nrows or ncols 0 when the box misses it). The ranges are widened by
    `_RANGE_SLACK` pixels so rounding can never drop a pixel; callers apply the exact comparisons.
    """
    height, width = grid.height, grid.width
    half_w, half_h = (width - 1) / 2, (height - 1) / 2
    to_px_w, to_px_h = width / (2 * MULTIPLIER), height / (2 * MULTIPLIER)
    # x_j >= lo  <=>  j >= lo*W/(2m) + (W-1)/2 ;  y_i < hi  <=>  i > (H-1)/2 - hi*H/(2m)
    col0 = torch.ceil(box_lo[:, 0] * to_px_w + half_w - _RANGE_SLACK).clamp(0, width).long()
    col1 = torch.floor(box_hi[:, 0] * to_px_w + half_w + _RANGE_SLACK).clamp(-1, width - 1).long()
    row0 = torch.ceil(half_h - box_hi[:, 1] * to_px_h - _RANGE_SLACK).clamp(0, height).long()
    row1 = torch.floor(half_h - box_lo[:, 1] * to_px_h + _RANGE_SLACK).clamp(-1, height - 1).long()
    return row0, col0, (row1 - row0 + 1).clamp(min=0), (col1 - col0 + 1).clamp(min=0)


def _range_pairs(face_ids: Tensor, ranges: tuple[Tensor, Tensor, Tensor, Tensor],
                 grid: _Grid) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Enumerate the (face, pixel) pairs of the ranges in face order, at most about `_PAIRS_PER_CHUNK`
    per chunk (a single face larger than that is one chunk).

    face_ids: (N,) flat b*F + f of the ranges' faces. Yields owner (K,) (the pair's row in face_ids),
    row (K,), col (K,) and pix (K,) = b*H*W + row*W + col, all int64.
    """
    row0, col0, nrows, ncols = ranges
    image = torch.div(face_ids, grid.num_faces, rounding_mode="floor")
    first_pix = image * (grid.height * grid.width) + row0 * grid.width + col0
    counts = nrows * ncols
    ends = counts.cumsum(0)
    starts = ends - counts
    ends_host = ends.cpu()
    total = int(ends_host[-1]) if len(ends_host) else 0
    start, done = 0, 0
    while done < total:
        stop = max(int(torch.searchsorted(ends_host, done + _PAIRS_PER_CHUNK, right=True)), start + 1)
        size = int(ends_host[stop - 1]) - done
        owner = torch.repeat_interleave(
            torch.arange(start, stop, device=counts.device), counts[start:stop], output_size=size
        )
        offset = torch.arange(done, done + size, device=counts.device) - starts[owner]
        span = ncols[owner]
        down = torch.div(offset, span, rounding_mode="floor")
        across = offset - down * span
        yield owner, row0[owner] + down, col0[owner] + across, first_pix[owner] + down * grid.width + across
        start, done = stop, done + size


def _uncovered_in_range(covered: Tensor, image: Tensor, ranges: tuple[Tensor, Tensor, Tensor, Tensor],
                        grid: _Grid) -> Tensor:
    """(N,) number of uncovered pixels in each range, from a summed-area table of the (B*H*W,) mask."""
    row0, col0, nrows, ncols = ranges
    uncovered = (~covered).reshape(-1, grid.height, grid.width).int()
    table = torch.nn.functional.pad(uncovered.cumsum(1).cumsum(2), (1, 0, 1, 0)).reshape(len(uncovered), -1)
    row1, col1 = row0 + nrows, col0 + ncols

    def at(row: Tensor, col: Tensor) -> Tensor:
        return table[image, row * (grid.width + 1) + col]

    return at(row1, col1) - at(row0, col1) - at(row1, col0) + at(row0, col0)


def _in_box(px: Tensor, py: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Kaolin's half-open box test lo <= p < hi on both axes; px, py broadcast against lo/hi (..., 2)."""
    return (px >= lo[..., 0]) & (px < hi[..., 0]) & (py >= lo[..., 1]) & (py < hi[..., 1])


def _barycentrics(v: Tensor, px: Tensor, py: Tensor) -> Tensor:
    """(..., 3) normalised edge weights of pixel centres for corners v (..., 3, 2), scaled units (§2.1);
    px, py broadcast against v[..., 0, 0]. Kaolin's expressions in Kaolin's order, so exact-edge pixels
    are decided as there."""
    ax, ay = v[..., 0, 0] - px, v[..., 0, 1] - py
    bx, by = v[..., 1, 0] - px, v[..., 1, 1] - py
    cx, cy = v[..., 2, 0] - px, v[..., 2, 1] - py
    w0 = bx * cy - by * cx
    w1 = cx * ay - cy * ax
    w2 = ax * by - ay * bx
    area = w0 + w1 + w2
    area = area + torch.copysign(torch.full_like(area, AREA_EPS), area)
    return torch.stack((w0, w1, w2), dim=-1) / area[..., None]


def _nearest_faces(verts: Tensor, verts_z: Tensor, active: Tensor, grid: _Grid) -> tuple[Tensor, Tensor, Tensor]:
    """Hard pass (§2.1) over the active faces: per covered pixel, the winning face and its weights.

    verts: (B, F, 3, 2) scaled image positions; verts_z: (B, F, 3); active: (B, F) bool.
    Returns pix (P,) flat pixel index b*H*W + i*W + j, face (P,) flat index b*F + f and weights (P, 3).
    """
    batch, num_faces = active.shape
    hw = grid.height * grid.width
    face_ids = active.reshape(-1).nonzero().squeeze(1)
    corners = verts.reshape(-1, 3, 2)[face_ids]
    depths = verts_z.reshape(-1, 3)[face_ids]
    box_lo, box_hi = corners.amin(1), corners.amax(1)
    hits = []
    for owner, row, col, pix in _range_pairs(face_ids, _pixel_ranges(box_lo, box_hi, grid), grid):
        px, py = grid.xs[col], grid.ys[row]
        keep = _in_box(px, py, box_lo[owner], box_hi[owner])
        owner, pix, px, py = owner[keep], pix[keep], px[keep], py[keep]
        weights = _barycentrics(corners[owner], px, py)
        inside = (weights >= 0).all(1)
        owner, pix, weights = owner[inside], pix[inside], weights[inside]
        z = depths[owner]
        z = weights[:, 0] * z[:, 0] + weights[:, 1] * z[:, 1] + weights[:, 2] * z[:, 2]
        hits.append((pix, face_ids[owner], z, weights))
    if not hits:
        empty = torch.zeros(0, dtype=torch.long, device=verts.device)
        return empty, empty, verts.new_zeros(0, 3)
    pix, face, z, weights = (torch.cat(parts) for parts in zip(*hits, strict=True))
    best_z = torch.full((batch * hw,), -torch.inf, dtype=z.dtype, device=z.device)
    best_z.scatter_reduce_(0, pix, z, "amax")
    # strict-greater update in index order == lowest face index among the pairs at the maximum
    top = z == best_z[pix]
    best_face = torch.full((batch * hw,), batch * num_faces, dtype=torch.long, device=z.device)
    best_face.scatter_reduce_(0, pix[top], face[top], "amin")
    win = top & (face == best_face[pix])
    return pix[win], face[win], weights[win]


def _cross(u: Tensor, v: Tensor) -> Tensor:
    """z of the 2-D cross product of (..., 2) vectors."""
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _perp(u: Tensor) -> Tensor:
    """(u_y, -u_x): the gradient of cross(u', v) w.r.t. u' is perp(v), w.r.t. v it is -perp(u)."""
    return torch.stack((u[..., 1], -u[..., 0]), dim=-1)


class _InterpolateFeatures(torch.autograd.Function):
    """features[pix] = sum_k w_k f_k of the winning face; backward = spec §3.1 in closed form."""

    @staticmethod
    def forward(ctx, face_verts_image, face_features, pix, face, weights, grid):
        batch, num_faces, _, dim = face_features.shape
        f = face_features.reshape(batch * num_faces, 3, dim)[face]
        w = weights[:, :, None]
        out = face_features.new_zeros(batch * grid.height * grid.width, dim)
        out[pix] = w[:, 0] * f[:, 0] + w[:, 1] * f[:, 1] + w[:, 2] * f[:, 2]
        ctx.save_for_backward(face_verts_image, face_features, pix, face, weights)
        ctx.grid = grid
        return out

    @staticmethod
    def backward(ctx, grad_out):
        face_verts_image, face_features, pix, face, weights = ctx.saved_tensors
        batch, num_faces, _, dim = face_features.shape
        g = grad_out[pix]
        corner_rows = (face[:, None] * 3 + torch.arange(3, device=face.device)).reshape(-1)
        grad_verts = grad_features = None
        if ctx.needs_input_grad[1]:
            grad_features = face_features.new_zeros(batch * num_faces * 3, dim)
            grad_features.index_add_(0, corner_rows, (weights[:, :, None] * g[:, None, :]).reshape(-1, dim))
            grad_features = grad_features.reshape(face_features.shape)
        if ctx.needs_input_grad[0]:
            # I = f_a + w1 (f_b - f_a) + w2 (f_c - f_a), w1 = cross(r, e2)/k3, w2 = cross(e1, r)/k3 with
            # e1 = b - a, e2 = c - a, r = p - a and the pixel p fixed; differentiated exactly (with eps).
            v = face_verts_image.reshape(-1, 3, 2)[face]
            f = face_features.reshape(-1, 3, dim)[face]
            p = ctx.grid.centres(pix) / MULTIPLIER
            e1, e2, r = v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], p - v[:, 0]
            k3 = _cross(e1, e2)
            k3 = (k3 + torch.copysign(torch.full_like(k3, AREA_EPS), k3))[:, None]
            w1, w2 = _cross(r, e2)[:, None] / k3, _cross(e1, r)[:, None] / k3
            g1 = (g * (f[:, 1] - f[:, 0])).sum(-1)[:, None]
            g2 = (g * (f[:, 2] - f[:, 0])).sum(-1)[:, None]
            perp_e1, perp_e2, perp_r = _perp(e1), _perp(e2), _perp(r)
            grad_r = (g1 * perp_e2 - g2 * perp_e1) / k3
            grad_e1 = (g2 * (perp_r - w2 * perp_e2) - g1 * w1 * perp_e2) / k3
            grad_e2 = (g1 * (w1 * perp_e1 - perp_r) + g2 * w2 * perp_e1) / k3
            grad_corners = torch.stack((-(grad_r + grad_e1 + grad_e2), grad_e1, grad_e2), dim=1)
            grad_verts = face_verts_image.new_zeros(batch * num_faces * 3, 2)
            grad_verts.index_add_(0, corner_rows, grad_corners.reshape(-1, 2))
            grad_verts = grad_verts.reshape(face_verts_image.shape)
        return grad_verts, grad_features, None, None, None, None


def _soft_candidates(verts: Tensor, faces_ok: Tensor, covered: Tensor, grid: _Grid, box_len: float,
                     knum: int) -> tuple[Tensor, Tensor]:
    """Soft-mask candidates (§2.2 step 1): per uncovered pixel, the first knum faces by index whose box,
    enlarged by box_len, holds it. verts (B, F, 3, 2) scaled; faces_ok (B, F) bool; covered (B*H*W,)
    bool. Returns pix (N,) flat pixel and face (N,) flat b*F + f, ordered by face within each pixel."""
    face_ids = faces_ok.reshape(-1).nonzero().squeeze(1)
    corners = verts.reshape(-1, 3, 2)[face_ids]
    margin = box_len * MULTIPLIER
    box_lo, box_hi = corners.amin(1) - margin, corners.amax(1) + margin
    ranges = _pixel_ranges(box_lo, box_hi, grid)
    # most faces lie inside the silhouette: skip those whose whole range is covered
    image = torch.div(face_ids, grid.num_faces, rounding_mode="floor")
    near_background = _uncovered_in_range(covered, image, ranges, grid) > 0
    face_ids, box_lo, box_hi = face_ids[near_background], box_lo[near_background], box_hi[near_background]
    ranges = tuple(part[near_background] for part in ranges)
    found = []
    for owner, row, col, pix in _range_pairs(face_ids, ranges, grid):
        keep = ~covered[pix]
        owner, row, col, pix = owner[keep], row[keep], col[keep], pix[keep]
        keep = _in_box(grid.xs[col], grid.ys[row], box_lo[owner], box_hi[owner])
        found.append((pix[keep], face_ids[owner[keep]]))
    if not found:
        empty = torch.zeros(0, dtype=torch.long, device=verts.device)
        return empty, empty
    pix, face = (torch.cat(parts) for parts in zip(*found, strict=True))
    per_pixel = torch.bincount(pix, minlength=covered.numel())
    if len(pix) and int(per_pixel.max()) > knum:
        # rank of each pair among its pixel's pairs, which the enumeration produced in face order
        order = torch.sort(pix, stable=True).indices
        first = per_pixel.cumsum(0) - per_pixel
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(pix), device=pix.device) - first[pix[order]]
        pix, face = pix[rank < knum], face[rank < knum]
    return pix, face


def _nearest_feature(v: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distance (scaled units) from p (N, 2) to the boundary of triangles v (N, 3, 2) and its type.

    Six candidates in Kaolin's order, the first minimum wins: edges 0->1, 1->2, 2->0 (perpendicular
    distance, or the far sentinel when the foot is off the closed segment), then corners 0, 1, 2.
    Returns d2 (N,) and kind (N,) int64 in [0, 6).
    """
    v1, v2 = v, v.roll(-1, dims=1)
    e = v2 - v1
    rel = p[:, None] - v1
    up = _cross(rel, e)
    down = (e * e).sum(-1) + DIST_EPS
    # foot of the perpendicular; a zero-length edge puts it at the origin, which is off the "segment"
    foot = ((e * e).sum(-1)[..., None] * p[:, None] - up[..., None] * _perp(e)) / down[..., None]
    on_segment = ((foot - v1) * (foot - v2)).sum(-1) <= 0
    far = FAR_SQ_NDC * MULTIPLIER * MULTIPLIER
    edge_d2 = torch.where(on_segment, up * up / down, torch.full_like(up, far))
    corner_d2 = (rel * rel).sum(-1)
    d2, kind = torch.cat((edge_d2, corner_d2), dim=1).min(dim=1)
    return d2, kind


def _distance_gradient(v: Tensor, p: Tensor, kind: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """d(d2)/d(corner) for the nearest feature `kind` (see `_nearest_feature`), scaled units.

    Returns (first corner (N,), its gradient (N, 2), second corner (N,), its gradient (N, 2)); the
    second gradient is 0 for a corner feature. An edge uses the exact derivative of up^2/down.
    """
    rows = torch.arange(len(kind), device=kind.device)
    is_edge = kind < 3
    first = torch.where(is_edge, kind, kind - 3)
    second = (first + 1) % 3
    v1, v2 = v[rows, first], v[rows, second]
    e = v2 - v1
    up = _cross(p - v1, e)[:, None]
    down = (e * e).sum(-1, keepdim=True) + DIST_EPS
    d2 = up * up / down
    edge_g1 = 2 * (up * _perp(p - v2) + d2 * e) / down
    edge_g2 = -2 * (up * _perp(p - v1) + d2 * e) / down
    g1 = torch.where(is_edge[:, None], edge_g1, 2 * (v1 - p))
    g2 = torch.where(is_edge[:, None], edge_g2, torch.zeros_like(edge_g2))
    return first, g1, second, g2


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, _PAIRS_PER_CHUNK):
        yield slice(start, min(start + _PAIRS_PER_CHUNK, n))


class _SoftMask(torch.autograd.Function):
    """DIB-R soft mask (§2.2) with the closed-form backward of §3.2 over the candidates with P > 0."""

    @staticmethod
    def forward(ctx, face_verts_image, face_idx, faces_ok, grid, sigma_inv, box_len, knum):
        verts = face_verts_image * MULTIPLIER
        covered = face_idx >= 0
        pix, face = _soft_candidates(verts, faces_ok, covered, grid, box_len, knum)
        corners = verts.reshape(-1, 3, 2)
        prob = face_verts_image.new_empty(len(pix))
        kind = torch.empty_like(pix)
        for part in _chunks(len(pix)):
            d2, kind[part] = _nearest_feature(corners[face[part]], grid.centres(pix[part]))
            prob[part] = torch.exp(-(sigma_inv * d2 / MULTIPLIER / MULTIPLIER))
        outside = face_verts_image.new_ones(covered.numel())
        outside.scatter_reduce_(0, pix, 1 - prob, "prod")
        soft_mask = torch.where(covered, torch.ones_like(outside), 1 - outside)
        # dS/d(d2_ndc) = -sigma_inv P prod_{g != f}(1 - P_g), with Kaolin's (1 - S)/(1 - P + 1e-7) form
        slope = -sigma_inv * prob * outside[pix] / (1 - prob + DIST_EPS)
        live = slope != 0
        ctx.save_for_backward(face_verts_image, pix[live], face[live], kind[live].to(torch.uint8),
                              slope[live])
        ctx.grid = grid
        return soft_mask

    @staticmethod
    def backward(ctx, grad_soft_mask):
        face_verts_image, pix, face, kind, slope = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        corners = face_verts_image.reshape(-1, 3, 2) * MULTIPLIER
        grad = face_verts_image.new_zeros(corners.shape[0] * 3, 2)
        for part in _chunks(len(pix)):
            f = face[part]
            first, g1, second, g2 = _distance_gradient(corners[f], ctx.grid.centres(pix[part]),
                                                       kind[part].long())
            # d(d2_ndc)/d(v_ndc) = d(d2_scaled)/d(v_scaled) / MULTIPLIER
            upstream = (grad_soft_mask[pix[part]] * slope[part] / MULTIPLIER)[:, None]
            grad.index_add_(0, f * 3 + first, upstream * g1)
            grad.index_add_(0, f * 3 + second, upstream * g2)
        return grad.reshape(face_verts_image.shape), None, None, None, None, None, None
