"""Triton fast path of the DIB-R rasterizer (hard pass, soft silhouette, forward and backward).

`renderer.rasterize.rasterize` calls `rasterize_triton` for CUDA tensors; the plain-PyTorch
`rasterize_reference` stays the fallback and the test oracle. The semantics are those of
spec/renderer-math.md §2–§3 (Kaolin v0.12 DIB-R). The hard pass repeats the reference's arithmetic
step by step (scaled units, float32 pixel centres, IEEE division, no fused multiply-add), so the
face index maps and features agree bit for bit; the soft mask and the gradients agree to ~1e-7
relative (other summation order, reciprocals instead of per-pixel divisions in the distances).

Three kernels:

* `_bin_kernel`, one program per (image, row of 4×16-pixel tiles): for each tile, the faces whose
  box enlarged by ``box_len`` can touch it, compacted in index order. The forward loops over these
  short lists instead of all F faces. It also clears the soft-candidate flags below.
* `_forward_kernel`, one program per (image, pixel tile): the hard pass (running best depth with
  the strict-greater rule, so ties keep the lowest face index), the interpolated features, then the
  soft silhouette of the uncovered pixels, keeping the first ``knum`` candidates in index order with
  a prefix count. It also records per pixel the index of the last accepted candidate, so the
  backward can tell accepted faces apart without re-counting, and flags every face that was
  accepted somewhere.
* `_backward_kernel`, one program per (image, block of 4 faces): it visits the pixels of each
  front face's box and sums the barycentric gradient of the pixels the face won, then, for the
  flagged faces only, the pixels of the enlarged box and the soft-mask gradient of the uncovered
  pixels where the face is a candidate, and writes each face's gradient once. No atomics, so the
  backward is deterministic: the same inputs give bitwise the same gradients on every run.

Blocks with nothing to do (only culled faces, no soft candidate, no pixel won) skip their
arithmetic. The launch shapes below were picked by sweeping them on an H100 at B = 48 and 8,
128×128, 128×64 and 160×96 (the 1280-face icosphere). There the three kernels take about 0.34 ms
of GPU time at B = 48, 128×128 (bench/render.py's last table), and a call's wall time is set by the
CPU (Python, autograd and three launches), not by the kernels.
"""

import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from renderer.rasterize import (
    AREA_EPS,
    DIST_EPS,
    FAR_SQ_NDC,
    MULTIPLIER,
    Rasterized,
    check_inputs,
)

# The reference's constants, as compile-time values for the kernels.
_M = tl.constexpr(MULTIPLIER)
_AREA_EPS_C = tl.constexpr(AREA_EPS)
_DIST_EPS_C = tl.constexpr(DIST_EPS)
_FAR_SQ = tl.constexpr(FAR_SQ_NDC * MULTIPLIER * MULTIPLIER)
_NO_CUTOFF = tl.constexpr(2**31 - 1)  # fewer than knum candidates: every one is accepted

# Launch shapes: forward pixel tiles of 4 x 16 and faces in blocks of 8; backward blocks of
# 4 faces x 8 pixels of their rectangles per step.
_TILE_H = 4
_TILE_W = 16
_BIN_BLOCK_F = 256
_BIN_WARPS = 2
_FWD_BLOCK_F = 8
_FWD_WARPS = 4
_BWD_BLOCK_FB = 4
_BWD_BLOCK_P = 8
_BWD_WARPS = 1


@triton.jit
def _div(a, b):
    # Triton's float32 `/` is approximate; the reference divides with IEEE rounding.
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _pixel_centres(i, j, H, W, cx_scale, cy_scale, dtype: tl.constexpr):
    # Scaled NDC centre of pixel (row i, column j), computed in float32 as Kaolin does.
    px = cx_scale * (2 * j + 1 - W).to(tl.float32)
    py = cy_scale * (H - 2 * i - 1).to(tl.float32)
    return px.to(dtype), py.to(dtype)


@triton.jit
def _load_corners(fvi_ptr, face, mask):
    # face: flat index b * F + f into the (B, F, 3, 2) tensor; returns the scaled corners.
    x0 = tl.load(fvi_ptr + face * 6 + 0, mask=mask, other=0.0) * _M
    y0 = tl.load(fvi_ptr + face * 6 + 1, mask=mask, other=0.0) * _M
    x1 = tl.load(fvi_ptr + face * 6 + 2, mask=mask, other=0.0) * _M
    y1 = tl.load(fvi_ptr + face * 6 + 3, mask=mask, other=0.0) * _M
    x2 = tl.load(fvi_ptr + face * 6 + 4, mask=mask, other=0.0) * _M
    y2 = tl.load(fvi_ptr + face * 6 + 5, mask=mask, other=0.0) * _M
    return x0, y0, x1, y1, x2, y2


@triton.jit
def _face_finite(x0, y0, x1, y1, x2, y2, fvz_ptr, face, mask):
    # The reference leaves out faces with a non-finite (scaled) corner or depth, in both passes.
    z0 = tl.load(fvz_ptr + face * 3 + 0, mask=mask, other=0.0)
    z1 = tl.load(fvz_ptr + face * 3 + 1, mask=mask, other=0.0)
    z2 = tl.load(fvz_ptr + face * 3 + 2, mask=mask, other=0.0)
    inf = float("inf")
    return ((tl.abs(x0) < inf) & (tl.abs(y0) < inf) & (tl.abs(x1) < inf) & (tl.abs(y1) < inf)
            & (tl.abs(x2) < inf) & (tl.abs(y2) < inf) & (tl.abs(z0) < inf) & (tl.abs(z1) < inf)
            & (tl.abs(z2) < inf))


@triton.jit
def _edge_weights(px, py, x0, y0, x1, y1, x2, y2):
    # Normalised edge weights of pixel p for the triangle of corners 0, 1, 2 (scaled units).
    w0 = (x1 - px) * (y2 - py) - (y1 - py) * (x2 - px)
    w1 = (x2 - px) * (y0 - py) - (y2 - py) * (x0 - px)
    w2 = (x0 - px) * (y1 - py) - (y0 - py) * (x1 - px)
    area = w0 + w1 + w2
    area = tl.where(area >= 0, area + _AREA_EPS_C, area - _AREA_EPS_C)
    return _div(w0, area), _div(w1, area), _div(w2, area)


@triton.jit
def _inverse_lengths(x0, y0, x1, y1, x2, y2):
    # 1 / (squared length + tiny) of edges 0→1, 1→2, 2→0, once per face instead of per pixel.
    return (1.0 / ((x1 - x0) * (x1 - x0) + (y1 - y0) * (y1 - y0) + _DIST_EPS_C),
            1.0 / ((x2 - x1) * (x2 - x1) + (y2 - y1) * (y2 - y1) + _DIST_EPS_C),
            1.0 / ((x0 - x2) * (x0 - x2) + (y0 - y2) * (y0 - y2) + _DIST_EPS_C))


@triton.jit
def _edge_distance(px, py, ax, ay, bx, by, inv_down):
    # Squared distance (scaled units) from p to the line a→b, or the far value when the foot of the
    # perpendicular falls outside the closed segment. The soft mask only needs it to ~1e-7
    # relative, so it multiplies by the face's reciprocal instead of dividing per pixel.
    ex = bx - ax
    ey = by - ay
    length2 = ex * ex + ey * ey
    up = (px - ax) * ey - (py - ay) * ex
    foot_x = (length2 * px - up * ey) * inv_down
    foot_y = (length2 * py + up * ex) * inv_down
    on_segment = (foot_x - ax) * (foot_x - bx) + (foot_y - ay) * (foot_y - by) <= 0
    return tl.where(on_segment, up * up * inv_down, _FAR_SQ)


@triton.jit
def _boundary_distance(px, py, x0, y0, x1, y1, x2, y2, inv0, inv1, inv2):
    # Squared distance from p to the triangle's boundary: the first minimum over edges 0→1, 1→2,
    # 2→0, then corners 0, 1, 2; kind is the index of that feature in this order. inv0..2 come
    # from _inverse_lengths.
    d2 = _edge_distance(px, py, x0, y0, x1, y1, inv0)
    kind = tl.zeros(d2.shape, tl.int32)
    e = _edge_distance(px, py, x1, y1, x2, y2, inv1)
    kind = tl.where(e < d2, 1, kind)
    d2 = tl.minimum(e, d2)
    e = _edge_distance(px, py, x2, y2, x0, y0, inv2)
    kind = tl.where(e < d2, 2, kind)
    d2 = tl.minimum(e, d2)
    e = (px - x0) * (px - x0) + (py - y0) * (py - y0)
    kind = tl.where(e < d2, 3, kind)
    d2 = tl.minimum(e, d2)
    e = (px - x1) * (px - x1) + (py - y1) * (py - y1)
    kind = tl.where(e < d2, 4, kind)
    d2 = tl.minimum(e, d2)
    e = (px - x2) * (px - x2) + (py - y2) * (py - y2)
    kind = tl.where(e < d2, 5, kind)
    d2 = tl.minimum(e, d2)
    return d2, kind


@triton.jit
def _box(x0, y0, x1, y1, x2, y2, margin):
    xlo = tl.minimum(tl.minimum(x0, x1), x2) - margin
    xhi = tl.maximum(tl.maximum(x0, x1), x2) + margin
    ylo = tl.minimum(tl.minimum(y0, y1), y2) - margin
    yhi = tl.maximum(tl.maximum(y0, y1), y2) + margin
    return xlo, xhi, ylo, yhi


@triton.jit
def _bin_kernel(
    fvi_ptr, fvz_ptr, list_ptr, count_ptr, margin_ptr, candidate_ptr,
    F, H, W, tiles_h, tiles_w, cx_scale, cy_scale,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # One program per (image, row of tiles): each face is loaded once for the whole row.
    pid = tl.program_id(0)
    b = pid // tiles_h
    # Clear this program's share of the image's soft-candidate flags, which the forward sets; this
    # saves a fill launch per call.
    share = tl.cdiv(F, tiles_h)
    first = (pid % tiles_h) * share
    for start in range(first, tl.minimum(first + share, F), BLOCK_F):
        f = start + tl.arange(0, BLOCK_F)
        tl.store(candidate_ptr + b * F + f, tl.zeros([BLOCK_F], tl.int8), mask=(f < F) & (f < first + share))
    i0 = (pid % tiles_h) * TILE_H
    t = tl.arange(0, BLOCK_T)
    tmask = t < tiles_w
    j0 = t * TILE_W
    dtype = fvi_ptr.dtype.element_ty
    tx_lo, ty_hi = _pixel_centres(i0, j0, H, W, cx_scale, cy_scale, dtype)
    tx_hi, ty_lo = _pixel_centres(tl.minimum(i0 + TILE_H, H) - 1, tl.minimum(j0 + TILE_W, W) - 1,
                                  H, W, cx_scale, cy_scale, dtype)
    tile = pid * tiles_w + t  # = (b * tiles_h + tile row) * tiles_w + tile column
    margin = tl.load(margin_ptr)
    count = tl.zeros([BLOCK_T], tl.int32)
    for start in range(0, F, BLOCK_F):
        f = start + tl.arange(0, BLOCK_F)
        fmask = f < F
        x0, y0, x1, y1, x2, y2 = _load_corners(fvi_ptr, b * F + f, fmask)
        xlo, xhi, ylo, yhi = _box(x0, y0, x1, y1, x2, y2, margin)
        # Necessary for some pixel centre of the tile to pass the enlarged half-open box test,
        # which contains the hard pass's box test.
        row_hit = (fmask & (ylo <= ty_hi) & (yhi > ty_lo)
                   & _face_finite(x0, y0, x1, y1, x2, y2, fvz_ptr, b * F + f, fmask))
        hit = row_hit[:, None] & tmask[None, :] & (xlo[:, None] <= tx_hi[None, :]) & (xhi[:, None] > tx_lo[None, :])
        hit_i = hit.to(tl.int32)
        slot = count[None, :] + tl.cumsum(hit_i, 0) - 1
        tl.store(list_ptr + tile[None, :].to(tl.int64) * F + slot, f[:, None], mask=hit)
        count += tl.sum(hit_i, 0)
    tl.store(count_ptr + tile, count, mask=tmask)


@triton.jit
def _forward_kernel(
    fvi_ptr, fvz_ptr, ff_ptr, fnz_ptr, list_ptr, count_ptr, margin_ptr, sigma_ptr,
    feat_ptr, soft_ptr, idx_ptr, cutoff_ptr, candidate_ptr,
    F, H, W, D, knum, tiles_w, num_tiles, cx_scale, cy_scale,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_tiles
    tile = pid % num_tiles
    p = tl.arange(0, TILE_H * TILE_W)
    i = (tile // tiles_w) * TILE_H + p // TILE_W
    j = (tile % tiles_w) * TILE_W + p % TILE_W
    pmask = (i < H) & (j < W)
    pix = (b * H + i) * W + j
    dtype = fvi_ptr.dtype.element_ty
    px, py = _pixel_centres(i, j, H, W, cx_scale, cy_scale, dtype)
    px2 = px[:, None]
    py2 = py[:, None]
    n_list = tl.load(count_ptr + pid)
    list_base = list_ptr + pid.to(tl.int64) * F

    # Hard pass: nearest covering face; a later face must be strictly nearer, so ties keep the
    # lowest index (the list is in index order and tl.min picks the lowest index in a block).
    best_z = tl.full([TILE_H * TILE_W], float("-inf"), dtype)
    best_f = tl.full([TILE_H * TILE_W], -1, tl.int32)
    for start in range(0, n_list, BLOCK_F):
        k = start + tl.arange(0, BLOCK_F)
        kmask = k < n_list
        f = tl.load(list_base + k, mask=kmask, other=0)
        face = b * F + f
        valid = kmask & (tl.load(fnz_ptr + face, mask=kmask, other=-1.0) >= 0)
        x0, y0, x1, y1, x2, y2 = _load_corners(fvi_ptr, face, kmask)
        xlo, xhi, ylo, yhi = _box(x0, y0, x1, y1, x2, y2, 0.0)
        in_box = (valid[None, :] & (xlo[None, :] <= px2) & (px2 < xhi[None, :]) & (ylo[None, :] <= py2)
                  & (py2 < yhi[None, :]))
        # Blocks of culled faces or of boxes that miss every pixel skip the arithmetic.
        if tl.max(in_box.to(tl.int32)) > 0:
            w0, w1, w2 = _edge_weights(px2, py2, x0[None, :], y0[None, :], x1[None, :], y1[None, :],
                                       x2[None, :], y2[None, :])
            z0 = tl.load(fvz_ptr + face * 3 + 0, mask=kmask, other=0.0)
            z1 = tl.load(fvz_ptr + face * 3 + 1, mask=kmask, other=0.0)
            z2 = tl.load(fvz_ptr + face * 3 + 2, mask=kmask, other=0.0)
            z = w0 * z0[None, :] + w1 * z1[None, :] + w2 * z2[None, :]
            cover = in_box & (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
            z = tl.where(cover, z, float("-inf"))
            z_max = tl.max(z, 1)
            f_max = tl.min(tl.where(cover & (z == z_max[:, None]), f[None, :], F), 1)
            nearer = z_max > best_z
            best_z = tl.where(nearer, z_max, best_z)
            best_f = tl.where(nearer, f_max, best_f)
    covered = best_f >= 0
    tl.store(idx_ptr + pix, best_f.to(tl.int64), mask=pmask)

    # Features of the winning face, with its edge weights recomputed bit for bit.
    winner = b * F + tl.where(covered, best_f, 0)
    ax, ay, bx, by, cx, cy = _load_corners(fvi_ptr, winner, covered)
    wa, wb, wc = _edge_weights(px, py, ax, ay, bx, by, cx, cy)
    d = tl.arange(0, BLOCK_D)
    dmask = d[None, :] < D
    corner = ff_ptr + winner[:, None] * 3 * D + d[None, :]
    fa = tl.load(corner, mask=covered[:, None] & dmask, other=0.0)
    fb = tl.load(corner + D, mask=covered[:, None] & dmask, other=0.0)
    fc = tl.load(corner + 2 * D, mask=covered[:, None] & dmask, other=0.0)
    feat = tl.where(covered[:, None], wa[:, None] * fa + wb[:, None] * fb + wc[:, None] * fc, 0.0)
    tl.store(feat_ptr + pix[:, None] * D + d[None, :], feat, mask=pmask[:, None] & dmask)

    # Soft mask of the uncovered pixels: the first knum candidates in face-index order, counted
    # with a running prefix sum; the loop ends once every uncovered pixel has knum of them.
    margin = tl.load(margin_ptr)
    neg_sigma = tl.load(sigma_ptr)  # −σ⁻¹ per squared scaled unit: P = exp(d² · neg_sigma)
    uncovered = pmask & (best_f < 0)
    seen = tl.zeros([TILE_H * TILE_W], tl.int32)
    outside = tl.full([TILE_H * TILE_W], 1.0, dtype)
    cutoff = tl.full([TILE_H * TILE_W], _NO_CUTOFF, tl.int32)
    start = 0
    while (start < n_list) & (tl.max((uncovered & (seen < knum)).to(tl.int32), 0) > 0):
        k = start + tl.arange(0, BLOCK_F)
        kmask = k < n_list
        f = tl.load(list_base + k, mask=kmask, other=0)
        x0, y0, x1, y1, x2, y2 = _load_corners(fvi_ptr, b * F + f, kmask)
        xlo, xhi, ylo, yhi = _box(x0, y0, x1, y1, x2, y2, margin)
        hit = (uncovered[:, None] & kmask[None, :] & (xlo[None, :] <= px2) & (px2 < xhi[None, :])
               & (ylo[None, :] <= py2) & (py2 < yhi[None, :]))
        rank = seen[:, None] + tl.cumsum(hit.to(tl.int32), 1)
        accepted = hit & (rank <= knum)
        if tl.max(accepted.to(tl.int32)) > 0:
            inv0, inv1, inv2 = _inverse_lengths(x0, y0, x1, y1, x2, y2)
            d2, _ = _boundary_distance(px2, py2, x0[None, :], y0[None, :], x1[None, :], y1[None, :],
                                       x2[None, :], y2[None, :], inv0[None, :], inv1[None, :], inv2[None, :])
            prob = tl.exp(d2 * neg_sigma)
            outside *= tl.reduce(tl.where(accepted, 1.0 - prob, 1.0), 1, _mul)
            # Tell the backward which faces have soft-mask work (several programs may write 1).
            tl.store(candidate_ptr + b * F + f, tl.full([BLOCK_F], 1, tl.int8),
                     mask=kmask & (tl.max(accepted.to(tl.int32), 0) > 0))
        cutoff = tl.minimum(cutoff, tl.min(tl.where(hit & (rank == knum), f[None, :], _NO_CUTOFF), 1))
        seen += tl.sum(hit.to(tl.int32), 1)
        start += BLOCK_F
    tl.store(soft_ptr + pix, tl.where(covered, 1.0, 1.0 - outside), mask=pmask)
    tl.store(cutoff_ptr + pix, cutoff, mask=pmask)


@triton.jit
def _select(index, v0, v1, v2):
    return tl.where(index == 0, v0, tl.where(index == 1, v1, v2))


@triton.jit
def _corner_share(corner, hit, upstream, first, second, g_first, g_second):
    """The soft-mask gradient that reaches `corner` through the nearest edge's two end points."""
    return tl.where(hit, upstream * (tl.where(first == corner, g_first, 0.0)
                                     + tl.where(second == corner, g_second, 0.0)), 0.0)


@triton.jit
def _pixel_rect(xlo, xhi, ylo, yhi, ok, H, W, cx_scale, cy_scale):
    # Row/column range of the pixels whose centres can lie in the box [xlo, xhi] x [ylo, yhi]
    # (scaled units), one pixel of slack for rounding (the exact tests decide), as its first row and
    # column, its width and its pixel count; empty where `ok` is false.
    j_lo = (tl.where(ok, xlo, 0.0).to(tl.float32) / cx_scale + (W - 1)) * 0.5
    j_hi = (tl.where(ok, xhi, 0.0).to(tl.float32) / cx_scale + (W - 1)) * 0.5
    i_lo = ((H - 1) - tl.where(ok, yhi, 0.0).to(tl.float32) / cy_scale) * 0.5
    i_hi = ((H - 1) - tl.where(ok, ylo, 0.0).to(tl.float32) / cy_scale) * 0.5
    j_lo = tl.maximum(tl.floor(tl.maximum(j_lo, -1.0)).to(tl.int32) - 1, 0)
    j_hi = tl.minimum(tl.ceil(tl.minimum(j_hi, W)).to(tl.int32) + 1, W - 1)
    i_lo = tl.maximum(tl.floor(tl.maximum(i_lo, -1.0)).to(tl.int32) - 1, 0)
    i_hi = tl.minimum(tl.ceil(tl.minimum(i_hi, H)).to(tl.int32) + 1, H - 1)
    cols = tl.maximum(j_hi - j_lo + 1, 1)
    n_pix = tl.where(ok & (j_hi >= j_lo) & (i_hi >= i_lo), cols * (i_hi - i_lo + 1), 0)
    return i_lo, j_lo, cols, n_pix


@triton.jit
def _rect_step(step, i_lo, j_lo, cols, n_pix, b, H, W, BLOCK_P: tl.constexpr):
    # Lanes (face, k) of loop step `step` over the faces' rectangles from _pixel_rect: in-range
    # mask, row, column and flat pixel index of the rectangle's pixel step * BLOCK_P + k.
    lin = step * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
    i = i_lo[:, None] + lin // cols[:, None]
    j = j_lo[:, None] + lin % cols[:, None]
    return lin < n_pix[:, None], i, j, (b * H + i) * W + j


@triton.jit
def _backward_kernel(
    fvi_ptr, fvz_ptr, ff_ptr, fnz_ptr, idx_ptr, cutoff_ptr, soft_ptr, candidate_ptr, gfeat_ptr,
    gsoft_ptr, margin_ptr, sigma_ptr, gfvi_ptr, gff_ptr,
    F, H, W, D, blocks_per_image, cx_scale, cy_scale,
    BLOCK_FB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (image, block of faces): lanes are (face, pixel of that face's rectangle).
    # Two loops: the pixels of each face's box, for the pixels it won, then, only for the faces the
    # forward accepted as a soft-mask candidate somewhere, the pixels of its enlarged box.
    pid = tl.program_id(0)
    b = pid // blocks_per_image
    f = (pid % blocks_per_image) * BLOCK_FB + tl.arange(0, BLOCK_FB)
    fmask = f < F
    face = b * F + f
    dtype = fvi_ptr.dtype.element_ty
    x0, y0, x1, y1, x2, y2 = _load_corners(fvi_ptr, face, fmask)
    margin = tl.load(margin_ptr)
    neg_sigma = tl.load(sigma_ptr)
    inv0, inv1, inv2 = _inverse_lengths(x0, y0, x1, y1, x2, y2)
    ok = fmask & _face_finite(x0, y0, x1, y1, x2, y2, fvz_ptr, face, fmask)
    front = ok & (tl.load(fnz_ptr + face, mask=fmask, other=-1.0) >= 0)
    bxlo, bxhi, bylo, byhi = _box(x0, y0, x1, y1, x2, y2, 0.0)
    hi_lo, hj_lo, h_cols, h_pix = _pixel_rect(bxlo, bxhi, bylo, byhi, front, H, W, cx_scale, cy_scale)
    xlo, xhi, ylo, yhi = _box(x0, y0, x1, y1, x2, y2, margin)
    candidate = ok & (tl.load(candidate_ptr + face, mask=fmask, other=0) != 0)
    si_lo, sj_lo, s_cols, s_pix = _pixel_rect(xlo, xhi, ylo, yhi, candidate, H, W, cx_scale, cy_scale)

    # The barycentric backward works in NDC units (spec §3.1): e1 = b − a, e2 = c − a.
    ax = tl.load(fvi_ptr + face * 6 + 0, mask=fmask, other=0.0)[:, None]
    ay = tl.load(fvi_ptr + face * 6 + 1, mask=fmask, other=0.0)[:, None]
    e1x = tl.load(fvi_ptr + face * 6 + 2, mask=fmask, other=0.0)[:, None] - ax
    e1y = tl.load(fvi_ptr + face * 6 + 3, mask=fmask, other=0.0)[:, None] - ay
    e2x = tl.load(fvi_ptr + face * 6 + 4, mask=fmask, other=0.0)[:, None] - ax
    e2y = tl.load(fvi_ptr + face * 6 + 5, mask=fmask, other=0.0)[:, None] - ay
    k3 = e1x * e2y - e1y * e2x
    k3 = tl.where(k3 >= 0, k3 + _AREA_EPS_C, k3 - _AREA_EPS_C)
    d = tl.arange(0, BLOCK_D)
    dmask = fmask[:, None] & (d[None, :] < D)
    corner = ff_ptr + face[:, None] * 3 * D + d[None, :]
    fa = tl.load(corner, mask=dmask, other=0.0)
    df1 = (tl.load(corner + D, mask=dmask, other=0.0) - fa)[:, None, :]
    df2 = (tl.load(corner + 2 * D, mask=dmask, other=0.0) - fa)[:, None, :]
    x0 = x0[:, None]
    y0 = y0[:, None]
    x1 = x1[:, None]
    y1 = y1[:, None]
    x2 = x2[:, None]
    y2 = y2[:, None]

    zero = tl.zeros([BLOCK_FB, BLOCK_P], dtype)
    gx0, gy0, gx1, gy1, gx2, gy2 = zero, zero, zero, zero, zero, zero
    gfa = tl.zeros([BLOCK_FB, BLOCK_D], dtype)
    gfb = tl.zeros([BLOCK_FB, BLOCK_D], dtype)
    gfc = tl.zeros([BLOCK_FB, BLOCK_D], dtype)
    # Pixels this face won: I = f_a + w1 (f_b − f_a) + w2 (f_c − f_a) with the pixel fixed.
    for step in range(0, tl.max((h_pix + BLOCK_P - 1) // BLOCK_P, 0)):
        lmask, i, j, pix = _rect_step(step, hi_lo, hj_lo, h_cols, h_pix, b, H, W, BLOCK_P)
        hard = lmask & (tl.load(idx_ptr + pix, mask=lmask, other=-2) == f[:, None])
        if tl.max(hard.to(tl.int32)) > 0:
            px, py = _pixel_centres(i, j, H, W, cx_scale, cy_scale, dtype)
            g = tl.load(gfeat_ptr + pix[:, :, None] * D + d[None, None, :],
                        mask=hard[:, :, None] & (d[None, None, :] < D), other=0.0)
            g1 = tl.sum(g * df1, 2)
            g2 = tl.sum(g * df2, 2)
            rx = px / _M - ax
            ry = py / _M - ay
            w1 = (rx * e2y - ry * e2x) / k3
            w2 = (e1x * ry - e1y * rx) / k3
            s = g1 * w1 + g2 * w2
            grad_rx = (g1 * e2y - g2 * e1y) / k3
            grad_ry = (g2 * e1x - g1 * e2x) / k3
            grad_bx = (g2 * ry - s * e2y) / k3
            grad_by = (s * e2x - g2 * rx) / k3
            grad_cx = (s * e1y - g1 * ry) / k3
            grad_cy = (g1 * rx - s * e1x) / k3
            gx0 += tl.where(hard, -(grad_rx + grad_bx + grad_cx), 0.0)
            gy0 += tl.where(hard, -(grad_ry + grad_by + grad_cy), 0.0)
            gx1 += tl.where(hard, grad_bx, 0.0)
            gy1 += tl.where(hard, grad_by, 0.0)
            gx2 += tl.where(hard, grad_cx, 0.0)
            gy2 += tl.where(hard, grad_cy, 0.0)
            gfa += tl.sum(tl.where(hard, 1.0 - w1 - w2, 0.0)[:, :, None] * g, 1)
            gfb += tl.sum(tl.where(hard, w1, 0.0)[:, :, None] * g, 1)
            gfc += tl.sum(tl.where(hard, w2, 0.0)[:, :, None] * g, 1)

    # Uncovered pixels where this face is among the first knum candidates (spec §3.2).
    for step in range(0, tl.max((s_pix + BLOCK_P - 1) // BLOCK_P, 0)):
        lmask, i, j, pix = _rect_step(step, si_lo, sj_lo, s_cols, s_pix, b, H, W, BLOCK_P)
        px, py = _pixel_centres(i, j, H, W, cx_scale, cy_scale, dtype)
        won = tl.load(idx_ptr + pix, mask=lmask, other=-2)
        cut = tl.load(cutoff_ptr + pix, mask=lmask, other=-1)
        soft_hit = (lmask & (won < 0) & (f[:, None] <= cut) & (xlo[:, None] <= px) & (px < xhi[:, None])
                    & (ylo[:, None] <= py) & (py < yhi[:, None]))
        if tl.max(soft_hit.to(tl.int32)) > 0:
            d2, kind = _boundary_distance(px, py, x0, y0, x1, y1, x2, y2,
                                          inv0[:, None], inv1[:, None], inv2[:, None])
            prob = tl.exp(d2 * neg_sigma)
            soft = tl.load(soft_ptr + pix, mask=soft_hit, other=0.0)
            gsoft = tl.load(gsoft_ptr + pix, mask=soft_hit, other=0.0)
            # dL/d(d² in NDC²) = gS (1 − S)/(1 − P + eps) · (−σ⁻¹ P), times 1/MULTIPLIER so that
            # d(d² scaled)/d(v scaled) below gives dL/d(v in NDC); neg_sigma is −σ⁻¹/MULTIPLIER².
            upstream = gsoft * (1.0 - soft) / (1.0 - prob + _DIST_EPS_C) * prob * neg_sigma * _M
            # Nearest feature: edge first→second (d² = up² / down, differentiated exactly) or a corner.
            is_edge = kind < 3
            first = tl.where(is_edge, kind, kind - 3)
            second = (first + 1) % 3
            ax_s = _select(first, x0, x1, x2)
            ay_s = _select(first, y0, y1, y2)
            bx_s = _select(second, x0, x1, x2)
            by_s = _select(second, y0, y1, y2)
            inv_down = _select(first, inv0[:, None], inv1[:, None], inv2[:, None])
            ex = bx_s - ax_s
            ey = by_s - ay_s
            up = (px - ax_s) * ey - (py - ay_s) * ex
            line_d2 = up * up * inv_down
            g1x = tl.where(is_edge, 2.0 * (up * (py - by_s) + line_d2 * ex) * inv_down, 2.0 * (ax_s - px))
            g1y = tl.where(is_edge, 2.0 * (up * (bx_s - px) + line_d2 * ey) * inv_down, 2.0 * (ay_s - py))
            g2x = tl.where(is_edge, -2.0 * (up * (py - ay_s) + line_d2 * ex) * inv_down, 0.0)
            g2y = tl.where(is_edge, -2.0 * (up * (ax_s - px) + line_d2 * ey) * inv_down, 0.0)
            gx0 += _corner_share(0, soft_hit, upstream, first, second, g1x, g2x)
            gy0 += _corner_share(0, soft_hit, upstream, first, second, g1y, g2y)
            gx1 += _corner_share(1, soft_hit, upstream, first, second, g1x, g2x)
            gy1 += _corner_share(1, soft_hit, upstream, first, second, g1y, g2y)
            gx2 += _corner_share(2, soft_hit, upstream, first, second, g1x, g2x)
            gy2 += _corner_share(2, soft_hit, upstream, first, second, g1y, g2y)

    out = gfvi_ptr + face * 6
    tl.store(out + 0, tl.sum(gx0, 1), mask=fmask)
    tl.store(out + 1, tl.sum(gy0, 1), mask=fmask)
    tl.store(out + 2, tl.sum(gx1, 1), mask=fmask)
    tl.store(out + 3, tl.sum(gy1, 1), mask=fmask)
    tl.store(out + 4, tl.sum(gx2, 1), mask=fmask)
    tl.store(out + 5, tl.sum(gy2, 1), mask=fmask)
    grad_corner = gff_ptr + face[:, None] * 3 * D + d[None, :]
    tl.store(grad_corner, gfa, mask=dmask)
    tl.store(grad_corner + D, gfb, mask=dmask)
    tl.store(grad_corner + 2 * D, gfc, mask=dmask)


def _scale(size: int) -> float:
    # MULTIPLIER / size rounded to float32, as Kaolin's pixel-centre arithmetic does.
    return float(np.float32(MULTIPLIER) / np.float32(size))


@functools.lru_cache(maxsize=64)
def _device_scalar(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Scalars travel as 1-element tensors of the input dtype: Triton passes Python floats as float32,
    # which would round them for float64 inputs. Cached, since a fill per call costs a launch.
    return torch.full((1,), value, dtype=dtype, device=device)


def _block_d(channels: int) -> int:
    return triton.next_power_of_2(max(channels, 1))


class _DibrRasterize(torch.autograd.Function):
    """Forward: binning + fused hard/soft kernel. Backward: one program per (image, block of faces)."""

    @staticmethod
    def forward(ctx, face_verts_image, face_verts_z, face_features, face_normals_z,
                height, width, sigma_inv, box_len, knum):
        batch, num_faces, _, channels = face_features.shape
        device, dtype = face_verts_image.device, face_verts_image.dtype
        tiles_h, tiles_w = triton.cdiv(height, _TILE_H), triton.cdiv(width, _TILE_W)
        num_tiles = tiles_h * tiles_w
        margin = _device_scalar(box_len * MULTIPLIER, dtype, device)
        # −σ⁻¹ per squared scaled unit, so that P = exp(d²_scaled · sigma)
        sigma = _device_scalar(-sigma_inv / (MULTIPLIER * MULTIPLIER), dtype, device)

        face_lists = torch.empty(batch * num_tiles * num_faces, dtype=torch.int32, device=device)
        list_counts = torch.empty(batch * num_tiles, dtype=torch.int32, device=device)
        features = torch.empty(batch, height, width, channels, dtype=dtype, device=device)
        soft_mask = torch.empty(batch, height, width, dtype=dtype, device=device)
        face_idx = torch.empty(batch, height, width, dtype=torch.int64, device=device)
        cutoff = torch.empty(batch, height, width, dtype=torch.int32, device=device)
        candidate = torch.empty(batch * num_faces, dtype=torch.int8, device=device)
        grid = (batch * num_tiles,)
        _bin_kernel[(batch * tiles_h,)](
            face_verts_image, face_verts_z, face_lists, list_counts, margin, candidate,
            num_faces, height, width, tiles_h, tiles_w, _scale(width), _scale(height),
            TILE_H=_TILE_H, TILE_W=_TILE_W, BLOCK_F=_BIN_BLOCK_F,
            BLOCK_T=triton.next_power_of_2(tiles_w), num_warps=_BIN_WARPS, enable_fp_fusion=False,
        )
        _forward_kernel[grid](
            face_verts_image, face_verts_z, face_features, face_normals_z, face_lists, list_counts,
            margin, sigma, features, soft_mask, face_idx, cutoff, candidate,
            num_faces, height, width, channels, knum, tiles_w, num_tiles, _scale(width), _scale(height),
            TILE_H=_TILE_H, TILE_W=_TILE_W, BLOCK_F=_FWD_BLOCK_F, BLOCK_D=_block_d(channels),
            num_warps=_FWD_WARPS, enable_fp_fusion=False,
        )
        ctx.mark_non_differentiable(face_idx)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for face_idx on every call
        ctx.save_for_backward(face_verts_image, face_verts_z, face_features, face_normals_z, face_idx, cutoff,
                              soft_mask, candidate)
        ctx.margin, ctx.sigma = margin, sigma
        return features, soft_mask, face_idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_features, grad_soft_mask, _grad_face_idx):
        (face_verts_image, face_verts_z, face_features, face_normals_z, face_idx, cutoff, soft_mask,
         candidate) = ctx.saved_tensors
        batch, num_faces, _, channels = face_features.shape
        height, width = soft_mask.shape[1:]
        if grad_features is None:  # the loss used only the soft mask
            grad_features = face_features.new_zeros(batch, height, width, channels)
        if grad_soft_mask is None:  # the loss used only the features
            grad_soft_mask = torch.zeros_like(soft_mask)
        # Every (image, face) program writes its whole gradient, so no zero fill is needed.
        grad_verts = torch.empty_like(face_verts_image)
        grad_face_features = torch.empty_like(face_features)
        blocks_per_image = triton.cdiv(num_faces, _BWD_BLOCK_FB)
        _backward_kernel[(batch * blocks_per_image,)](
            face_verts_image, face_verts_z, face_features, face_normals_z, face_idx, cutoff, soft_mask,
            candidate, grad_features.contiguous(), grad_soft_mask.contiguous(), ctx.margin, ctx.sigma,
            grad_verts, grad_face_features,
            num_faces, height, width, channels, blocks_per_image, _scale(width), _scale(height),
            BLOCK_FB=_BWD_BLOCK_FB, BLOCK_P=_BWD_BLOCK_P, BLOCK_D=_block_d(channels),
            num_warps=_BWD_WARPS, enable_fp_fusion=False,
        )
        return grad_verts, None, grad_face_features, None, None, None, None, None, None


def rasterize_triton(
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
    """DIB-R rasterization in Triton: the contract and results of `rasterize_reference`, faster.

    Args:
        face_verts_image: (B, F, 3, 2) float32/float64 NDC corner positions, x right, y up, the
            image spanning [−1, 1]; on a CUDA device (the CPU works only under TRITON_INTERPRET=1,
            set before this module is imported, for tests).
        face_verts_z: (B, F, 3) same dtype, camera-space corner z (visible < 0, larger = nearer);
            picks the nearest face, receives no gradient.
        face_features: (B, F, 3, D) same dtype, per-corner features to interpolate.
        face_normals_z: (B, F) camera-space unit-normal z; faces with a value < 0 are culled from the
            hard pass, the soft mask uses all faces. No gradient.
        height, width: output size H × W in pixels.
        sigma_inv: soft-mask sharpness in 1/NDC², P = exp(−sigma_inv · d²).
        box_len: NDC margin on every side of a face's box within which it is a soft-mask candidate.
        knum: at most this many candidates (the first by face index) per uncovered pixel.

    Returns:
        `Rasterized`: features (B, H, W, D), soft_mask (B, H, W) in [0, 1] (1 where covered),
        face_idx (B, H, W) int64 (−1 on background). Gradients reach face_verts_image and
        face_features; the backward uses no atomics and is bitwise deterministic.
    """
    check_inputs(face_verts_image, face_verts_z, face_features, face_normals_z, height, width,
                 sigma_inv, box_len, knum)
    if face_verts_image.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"rasterize_triton needs CUDA tensors, got {face_verts_image.device}; call "
                         "renderer.rasterize.rasterize, which runs the reference on other devices")
    height, width = int(height), int(width)
    batch, num_faces, _, channels = face_features.shape
    tiles = triton.cdiv(height, _TILE_H) * triton.cdiv(width, _TILE_W)
    if max(batch * height * width * channels, batch * num_faces * 3 * max(channels, 2), batch * tiles) >= 2**31:
        raise ValueError("rasterize_triton indexes with 32 bits; split the batch into smaller ones")
    features, soft_mask, face_idx = _DibrRasterize.apply(
        face_verts_image.contiguous(), face_verts_z.contiguous(), face_features.contiguous(),
        face_normals_z.contiguous(), height, width, float(sigma_inv), float(box_len), int(knum),
    )
    return Rasterized(features=features, soft_mask=soft_mask, face_idx=face_idx)
