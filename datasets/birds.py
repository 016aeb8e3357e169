"""Birds: procedural textured birds with known mesh and camera, rendered by Mitsuba 3 (not our renderer).

The embedded synthetic dataset (`datasets.synthetic`) is rendered by the very renderer the model
inverts, and its blobs hardly have a front. This dataset looks like the real task: birds with a beak
and a tail, patterned plumage, a directional light with shadows plus ambient light, image noise and
cluttered backgrounds, rendered by Mitsuba 3's CPU path tracer, in CUB's layout, with the 3-D ground
truth of every image.

Birds (`BirdSpecies`, `bird_mesh`), object frame of the model: beak towards +x, up +y, mirror-symmetric
through z = 0 (left/right). A bird is a tube around the x axis: the slice at x is the ellipse
``(y_c(x) + h(x) cos phi, w(x) sin phi)``, where the side-view outline (top ``y_c + h``, bottom
``y_c - h``) and the half-width ``w`` are smooth maxima over the parts: a pitched body ellipsoid, a
neck, a round head, a conical beak, a long flat tail, the folded wings (flank bulges and the
primaries over the tail base). Since x increases monotonically along the tube, the surface never
crosses itself: ``NUM_RINGS`` rings of ``NUM_AROUND`` vertices plus the two tips give a closed genus-0 mesh of
``2 + NUM_RINGS * NUM_AROUND`` vertices, the same for every bird, whose vertex set is exactly
z-symmetric (``verts[flip] == verts * (1, 1, -1)``). Every bird is centred (vertex mean 0) and scaled
to a length (x extent) of about 1.8, the template's. A species (class folder) fixes the proportions and
the palette; each instance jitters them. Plumage (a texture over the tube's (phi, x) parameters, the
same on both sides): back, belly, head cap, breast, eye with a stripe above it, wings with bars,
tail with a band, beak, plus a fine feather noise.

Images: a camera with azimuth uniform in (-180, 180] and elevation uniform in the given range frames
the bird as CUB's preparation crops it (the bounding box plus a margin on each side, here 5-15 % of
its longer side, padded to a square): the distance and look-at offset of our camera
(`renderer.camera`) are solved so that the bird's projected bounding box is centred and its longer side spans
``1 / (1 + 2 margin)`` of the frame. Where that would put the camera nearer than the distance range
allows (views along the bird), the camera stays at the nearest allowed distance and the margin
grows. The image the loader returns is the rendered frame itself, so its camera is exact, at any
output size (the frame is square and only resized). Lighting: a directional light from the camera's
side of the upper hemisphere (hard shadows, the bird shadows itself) plus a constant environment
(ambient), random intensities; a diffuse material; path-traced with ``spp`` samples per pixel, box
pixel filter. The render is composited over a random background (a vertical gradient of natural
colours with blotches and a few out-of-focus twigs), Gaussian noise is added, and the image is
saved as a quality-95 JPEG; the mask is the rendered alpha > 0.5.

Cache layout (CUB's, read by `datasets.cub.CUBDataset`)::

    <root>/manifest.json                        generation parameters (written last)
    <root>/{train,test}/<class>/<stem>.jpg      RGB
    <root>/{train,test}/<class>/<stem>_<r>.png  binary mask, r = foreground ratio
    <root>/{train,test}/gt.npz                  ground truth, one row per image (see `GT_KEYS`), plus
                                                ``faces`` (F, 3) shared by all meshes

Items are CUB items plus, without augmentation, ``"verts"`` (V, 3) float32 object frame,
``"azimuth_deg"``, ``"elevation_deg"``, ``"distance"`` (0-d float32) and ``"offset"`` (2,) float32,
our camera's parameters (`renderer.camera.camera_transform`), and the shared ``"faces"`` (F, 3) int64
(the evaluation compares sizes on the surface). Projecting ``verts`` with ``faces``
through that camera reproduces the stored mask (tests/test_birds.py states the bound).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets.common import mask_file_name
from datasets.cub import TRAIN_REPEATS
from datasets.synthetic import MANIFEST, SPLITS, GroundTruthDataset, ensure_cache, read_manifest
from renderer.camera import (
    FOVY_RAD,
    camera_position,
    camera_transform,
    perspective_projection,
    project,
    world_to_camera,
)

logger = logging.getLogger(__name__)

GT_FILE = "gt.npz"
GT_KEYS = ("verts", "azimuth_deg", "elevation_deg", "distance", "offset")
"""Per-image ground-truth arrays in ``gt.npz`` that items carry (besides ``stems``, ``labels``,
``light_direction`` and the shared ``faces``)."""
FORMAT_VERSION = 1
NUM_RINGS = 64
NUM_AROUND = 32
TEXTURE_SIZE = (128, 256)
"""Texture (rows over x from tail to beak, columns over phi) of the plumage."""
BIRD_LENGTH = 1.8
"""x extent of every bird (the template's)."""
JPEG_QUALITY = 95
JITTER = 0.12
"""Largest relative deviation of an instance's proportions from its species'."""
SATURATED = np.array([[0.85, 0.12, 0.08], [0.95, 0.8, 0.1], [0.15, 0.35, 0.85], [0.95, 0.5, 0.1],
                      [0.05, 0.05, 0.05], [0.3, 0.6, 0.2]])
"""Colours of the bright patches (sRGB): red, yellow, blue, orange, black, green."""
BEAKS = np.array([[0.12, 0.1, 0.09], [0.95, 0.65, 0.15], [0.55, 0.5, 0.45]])
"""Beak colours (sRGB): dark, yellow-orange, horn."""
HINT = "generate it with datasets.birds.ensure_birds (`python train.py --dataset birds` does)"


# ----------------------------------------------------------------------------- species and shapes


@dataclass(frozen=True)
class BirdSpecies:
    """Proportions (body-length units, angles in degrees) and palette (sRGB in [0, 1]) of one species.

    Instances draw each proportion from ``value * (1 + U(-JITTER, JITTER))``.
    """

    body_length: float  # semi-axis of the body ellipse along its axis
    body_height: float  # semi-axis across it (side view)
    body_width: float  # half-width of the body
    body_pitch: float  # body axis raised towards the front
    head_radius: float
    head_forward: float  # head centre: in front of the body centre ...
    head_up: float  # ... and above it
    beak_length: float
    beak_radius: float  # at the base
    beak_angle: float  # the beak points this far below the horizontal
    tail_length: float
    tail_width: float  # half-width of the fanned tail
    tail_droop: float  # the tail points this far below the body axis
    wing_bulge: float  # extra half-width of the flanks where the wings fold
    colours: tuple[tuple[float, float, float], ...]  # back, belly, cap, breast, wing, bar, tail, beak, stripe
    num_bars: int  # wing bars (0 .. 2)
    stripe: bool  # pale stripe above the eye
    tail_band: bool  # pale band at the tail end

    @classmethod
    def draw(cls, rng: np.random.Generator) -> BirdSpecies:
        # Plumage as in nature: a muted back, a pale belly, darker wings and tail, and one or two
        # patches (cap, breast) either in the same earth tones or in a saturated colour.
        back = np.clip(rng.uniform(0.15, 0.6) * np.array([1.0, rng.uniform(0.75, 1.0), rng.uniform(0.45, 0.9)])
                       + rng.normal(0, 0.04, 3), 0.03, 0.95)
        pale = np.clip(rng.uniform(0.7, 0.95) - rng.uniform(0, 0.2, 3), 0.2, 0.97)

        def patch(base):
            if rng.random() < 0.5:
                return SATURATED[rng.integers(len(SATURATED))] * rng.uniform(0.8, 1.0)
            return np.clip(base * rng.uniform(0.4, 1.3), 0.02, 0.97)

        colours = [back, np.clip(pale + rng.normal(0, 0.05, 3), 0.1, 0.98), patch(back), patch(pale),
                   back * rng.uniform(0.55, 0.9), np.clip(pale + 0.05, 0, 1), back * rng.uniform(0.5, 0.85),
                   BEAKS[rng.integers(len(BEAKS))], np.clip(pale + 0.1, 0, 1)]
        return cls(
            body_length=rng.uniform(0.42, 0.52), body_height=rng.uniform(0.25, 0.32),
            body_width=rng.uniform(0.22, 0.28), body_pitch=rng.uniform(10, 35),
            head_radius=rng.uniform(0.14, 0.2), head_forward=rng.uniform(0.38, 0.5),
            head_up=rng.uniform(0.2, 0.32), beak_length=rng.uniform(0.1, 0.3),
            beak_radius=rng.uniform(0.045, 0.075), beak_angle=rng.uniform(-5, 25),
            tail_length=rng.uniform(0.35, 0.7), tail_width=rng.uniform(0.08, 0.16),
            tail_droop=rng.uniform(0, 25), wing_bulge=rng.uniform(0.02, 0.05),
            colours=tuple(tuple(float(c) for c in p) for p in colours),
            num_bars=int(rng.integers(0, 3)), stripe=bool(rng.random() < 0.5), tail_band=bool(rng.random() < 0.4),
        )

    def instance(self, rng: np.random.Generator) -> BirdSpecies:
        """This species with every proportion jittered by `JITTER` and every colour by +-0.05."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "colours":
                v = tuple(tuple(float(np.clip(c + rng.uniform(-0.05, 0.05), 0.02, 0.98)) for c in p) for p in v)
            elif isinstance(v, float):
                v = v * (1 + rng.uniform(-JITTER, JITTER))
            values[f.name] = v
        return BirdSpecies(**values)


def _smooth_max(values: np.ndarray, sharpness: float, axis: int = 0) -> np.ndarray:
    """Log-sum-exp maximum over ``axis``; -inf entries (part absent at this x) are ignored."""
    top = values.max(axis=axis, keepdims=True)
    top_safe = np.where(np.isfinite(top), top, 0.0)
    out = top_safe + np.log(np.exp(sharpness * (values - top_safe)).sum(axis=axis, keepdims=True)) / sharpness
    return np.squeeze(np.where(np.isfinite(top), out, -np.inf), axis=axis)


def _ellipse_slice(x: np.ndarray, centre, semi_axes, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest y of an ellipse rotated by ``angle_deg`` at each x.

    Returns (lower, upper): where the vertical line misses the ellipse, lower = +inf and upper = -inf,
    so that the smooth maximum / minimum over the parts ignores it.
    """
    a, b = semi_axes
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    # Quadratic form of the rotated ellipse: m11 dx^2 + 2 m12 dx dy + m22 dy^2 = 1.
    m11 = c * c / a**2 + s * s / b**2
    m12 = c * s * (1 / a**2 - 1 / b**2)
    m22 = s * s / a**2 + c * c / b**2
    dx = x - centre[0]
    disc = m12**2 * dx**2 - m22 * (m11 * dx**2 - 1)
    root = np.sqrt(np.maximum(disc, 0.0))
    inside = disc > 0
    lower = np.where(inside, centre[1] + (-m12 * dx - root) / m22, np.inf)
    upper = np.where(inside, centre[1] + (-m12 * dx + root) / m22, -np.inf)
    return lower, upper


def _cone_slice(x: np.ndarray, base, tip, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Side-view extent (lower, upper) and half-width of a cone from ``base`` (radius) to ``tip`` (0)."""
    base, tip = np.asarray(base), np.asarray(tip)
    u = (x - base[0]) / (tip[0] - base[0])
    inside = (u >= 0) & (u <= 1)
    r = np.where(inside, radius * (1 - np.clip(u, 0, 1)), 0.0)
    slope = (tip[1] - base[1]) / (tip[0] - base[0])
    axis_y = base[1] + slope * (x - base[0])
    half = r * math.sqrt(1 + slope**2)
    return (np.where(inside, axis_y - half, np.inf), np.where(inside, axis_y + half, -np.inf),
            np.where(inside, r, -np.inf))


@dataclass(frozen=True)
class BirdProfile:
    """A bird's tube: per ring (R,) its x, centre height y_c, half-height h and half-width w, and the
    landmarks the plumage is painted from (object frame before centring and scaling)."""

    x: np.ndarray
    centre_y: np.ndarray
    half_height: np.ndarray
    half_width: np.ndarray
    landmarks: dict[str, float]


SHARPNESS = 40.0
"""Of the smooth maximum joining the parts' outlines (a blend over about 0.02 body lengths)."""


def ring_parameters() -> np.ndarray:
    """(NUM_RINGS,) tube parameters t in (0, 1) of the rings (t = 0 the tail tip, 1 the beak tip)."""
    return np.arange(1, NUM_RINGS + 1) / (NUM_RINGS + 1)


def bird_profile(sp: BirdSpecies, t: np.ndarray | None = None) -> BirdProfile:
    """The side-view outline and width of a bird at tube parameters ``t`` in (0, 1) (default: the rings,
    `ring_parameters`); ``x`` runs from the tail tip to the beak tip as ``(1 - cos(pi t)) / 2``."""
    pitch = sp.body_pitch
    head = np.array([sp.head_forward, sp.head_up])
    beak_dir = np.array([math.cos(math.radians(-sp.beak_angle)), math.sin(math.radians(-sp.beak_angle))])
    beak_base = head + beak_dir * sp.head_radius * 0.6
    beak_tip = head + beak_dir * (sp.head_radius + sp.beak_length)
    tail_angle = pitch + sp.tail_droop
    tail_dir = -np.array([math.cos(math.radians(tail_angle)), math.sin(math.radians(tail_angle))])
    body_rear = tail_dir * sp.body_length * 0.75
    tail_centre = body_rear + tail_dir * sp.tail_length * 0.5
    tail_end = body_rear + tail_dir * sp.tail_length
    wing_tip = body_rear + tail_dir * sp.tail_length * 0.35 + np.array([0.0, 0.05])
    neck_angle = math.degrees(math.atan2(head[1], head[0]))
    ellipses = [((0.0, 0.0), (sp.body_length, sp.body_height), pitch),
                (tuple(head), (sp.head_radius, sp.head_radius), 0.0),
                # The neck joins the body centre to the head, so no slice between them is empty.
                (tuple(0.55 * head), (0.55 * float(np.linalg.norm(head)), 0.8 * sp.head_radius), neck_angle),
                (tuple(tail_centre), (sp.tail_length * 0.5 + 0.01, 0.035), tail_angle),
                (tuple(wing_tip), (sp.tail_length * 0.35 + 0.1, 0.05), tail_angle - 8)]
    x_min = min(c[0] - math.hypot(a * math.cos(math.radians(t)), b * math.sin(math.radians(t)))
                for c, (a, b), t in ellipses)
    x_max = beak_tip[0]
    if t is None:
        t = ring_parameters()
    x = x_min + (x_max - x_min) * (1 - np.cos(np.pi * t)) / 2  # denser at both tips
    parts = [_ellipse_slice(x, *e) for e in ellipses]
    lower_beak, upper_beak, width_beak = _cone_slice(x, beak_base, beak_tip, sp.beak_radius)
    lowers = np.stack([p[0] for p in parts] + [lower_beak])
    uppers = np.stack([p[1] for p in parts] + [upper_beak])
    top = _smooth_max(uppers, SHARPNESS)
    bottom = -_smooth_max(-lowers, SHARPNESS)

    def half_width_of(lower_upper, width):  # width where the part is present
        return np.where(np.isfinite(lower_upper[1]), width, -np.inf)

    body_w = sp.body_width * np.sqrt(np.clip(1 - ((x - 0.0) / (sp.body_length * 1.02)) ** 2, 0, 1))
    wing_x0, wing_x1 = body_rear[0] - 0.05, sp.body_length * 0.35
    wing = sp.wing_bulge * np.clip(np.sin(np.pi * (x - wing_x0) / (wing_x1 - wing_x0)), 0, None) * (x > wing_x0) * (
        x < wing_x1)
    head_w = sp.head_radius * 0.9 * np.sqrt(np.clip(1 - ((x - head[0]) / sp.head_radius) ** 2, 0, 1))
    u_tail = np.clip((body_rear[0] - x) / (body_rear[0] - tail_end[0]), 0, 1)
    tail_w = (0.6 + 0.4 * u_tail) * sp.tail_width * np.sqrt(np.clip(1 - ((u_tail - 0.5) / 0.52) ** 2, 0, 1))
    widths = np.stack([
        half_width_of(parts[0], body_w + wing),
        half_width_of(parts[1], head_w),
        half_width_of(parts[2], 0.75 * sp.head_radius * np.ones_like(x)),
        half_width_of(parts[3], tail_w),
        half_width_of(parts[4], 0.6 * sp.body_width * np.ones_like(x)),
        width_beak,
    ])
    width = np.maximum(_smooth_max(widths, SHARPNESS * 2), 0.0)
    # Never thicker than the outline allows at the tips, where every part ends (keeps the tips pointed).
    width = np.minimum(width, np.maximum(top - bottom, 0.0) * 4)
    landmarks = dict(head_x=head[0], head_y=head[1], head_radius=sp.head_radius, beak_base_x=beak_base[0],
                     body_rear_x=body_rear[0], tail_end_x=tail_end[0], wing_x0=wing_x0, wing_x1=wing_x1 + 0.05,
                     x_min=x_min, x_max=x_max)
    return BirdProfile(x, (top + bottom) / 2, np.maximum((top - bottom) / 2, 1e-4), np.maximum(width, 1e-4),
                       landmarks)


def tube_faces() -> np.ndarray:
    """(F, 3) int64 faces of the bird tube, outward and counter-clockwise, F = 2 * NUM_RINGS * NUM_AROUND.

    Vertex 0 is the tail tip, 1 the beak tip, then ring r (tail to beak), around index j (phi = 2 pi j
    / NUM_AROUND, phi = 0 on top, +z at phi = pi / 2) at ``2 + r * NUM_AROUND + j``.
    """
    n = NUM_AROUND
    j = np.arange(n)
    j1 = (j + 1) % n
    faces = []
    for r in range(NUM_RINGS - 1):
        a, b = 2 + r * n + j, 2 + r * n + j1
        c, d = a + n, b + n
        faces += [np.stack([a, b, c], 1), np.stack([b, d, c], 1)]
    first, last = 2 + j, 2 + (NUM_RINGS - 1) * n + j
    faces.append(np.stack([np.zeros(n, np.int64), 2 + j1, first], 1))
    faces.append(np.stack([np.ones(n, np.int64), last, 2 + (NUM_RINGS - 1) * n + j1], 1))
    return np.concatenate(faces).astype(np.int64)


def _phi() -> np.ndarray:
    return 2 * np.pi * np.arange(NUM_AROUND) / NUM_AROUND


def bird_mesh(profile: BirdProfile) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) float64 of the tube (`tube_faces` order), and the (centre, scale) applied.

    The mesh is centred (vertex mean 0) and scaled to x extent `BIRD_LENGTH`; returns
    ``(verts, transform)`` with ``transform = (shift (3,), scale)`` as a (4,) array, so that
    ``verts = (raw - shift) * scale``.
    """
    phi = _phi()
    ring = np.stack([
        np.broadcast_to(profile.x[:, None], (NUM_RINGS, NUM_AROUND)),
        profile.centre_y[:, None] + profile.half_height[:, None] * np.cos(phi),
        profile.half_width[:, None] * np.sin(phi),
    ], -1).reshape(-1, 3)
    lm = profile.landmarks
    tips = np.array([[lm["x_min"], profile.centre_y[0], 0.0], [lm["x_max"], profile.centre_y[-1], 0.0]])
    raw = np.concatenate([tips, ring])
    shift = raw.mean(0) * np.array([1.0, 1.0, 0.0])
    scale = BIRD_LENGTH / (raw[:, 0].max() - raw[:, 0].min())
    return (raw - shift) * scale, np.array([*shift, scale])


# ----------------------------------------------------------------------------- plumage


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def plumage(sp: BirdSpecies, rng: np.random.Generator) -> np.ndarray:
    """(TEXTURE_SIZE[0], TEXTURE_SIZE[1], 3) float32 sRGB texture in [0, 1] over the tube's parameters.

    Row k is the tube at ``t = (k + 0.5) / rows`` (`bird_profile`; row 0 at the tail tip), column m at
    ``phi = 2 pi (m + 0.5) / columns``; every pattern depends on phi only through cos(phi) and
    |sin(phi)|, so both sides of the bird look the same.
    """
    rows, cols = TEXTURE_SIZE
    ring_t = ring_parameters()
    # Texel centres at the renderer's texture coordinate v = t, clamped to the rings (the tips are points).
    prof = bird_profile(sp, np.clip((np.arange(rows) + 0.5) / rows, ring_t[0], ring_t[-1]))
    lm = prof.landmarks
    phi = 2 * np.pi * (np.arange(cols) + 0.5) / cols
    x = prof.x[:, None]
    cos_phi, sin_abs = np.cos(phi)[None], np.abs(np.sin(phi))[None]
    y = prof.centre_y[:, None] + prof.half_height[:, None] * cos_phi
    z = prof.half_width[:, None] * sin_abs
    c = [np.array(v) for v in sp.colours]
    back, belly, cap, breast, wing, bar, tail, beak, stripe = c

    def paint(base: np.ndarray, colour: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return base * (1 - weight[..., None]) + colour * weight[..., None]

    tex = np.broadcast_to(back, (rows, cols, 3)).copy()
    belly_line = rng.uniform(-0.35, 0.05)
    tex = paint(tex, belly, _smoothstep(belly_line + 0.15, belly_line - 0.15, cos_phi) * np.ones_like(x))
    head_x, head_y, head_r = lm["head_x"], lm["head_y"], lm["head_radius"]
    breast_w = _smoothstep(0.2, -0.2, cos_phi) * _smoothstep(lm["head_x"] - head_r * 2.2, head_x - head_r, x) \
        * _smoothstep(head_x + head_r * 0.2, head_x - head_r * 0.3, x)
    tex = paint(tex, breast, breast_w)
    cap_w = _smoothstep(head_y + 0.1 * head_r, head_y + 0.45 * head_r, y) * _smoothstep(head_x - head_r * 1.1,
                                                                                        head_x - head_r * 0.6, x)
    tex = paint(tex, cap, cap_w)
    in_wing = (_smoothstep(lm["wing_x0"], lm["wing_x0"] + 0.1, x) * _smoothstep(lm["wing_x1"], lm["wing_x1"] - 0.1, x)
               * _smoothstep(-0.25, 0.0, cos_phi) * _smoothstep(0.95, 0.75, cos_phi))
    tex = paint(tex, wing, in_wing)
    span = lm["wing_x1"] - lm["wing_x0"]
    for k in range(sp.num_bars):
        centre = lm["wing_x1"] - span * (0.3 + 0.2 * k) - 0.15 * (cos_phi - 0.4) * span
        tex = paint(tex, bar, in_wing * (np.abs(x - centre) < 0.025 * span / 0.5))
    tail_w = _smoothstep(lm["body_rear_x"] + 0.05, lm["body_rear_x"] - 0.1, x) * np.ones_like(cos_phi)
    tex = paint(tex, tail, tail_w)
    if sp.tail_band:
        tex = paint(tex, bar, (x < lm["tail_end_x"] + 0.08) * np.ones_like(cos_phi))
    eye = np.array([head_x + 0.35 * head_r, head_y + 0.15 * head_r])
    eye_d = np.hypot(x - eye[0], y - eye[1])
    side = sin_abs > 0.45
    if sp.stripe:
        stripe_y = eye[1] + 0.35 * head_r
        tex = paint(tex, stripe, side * (np.abs(y - stripe_y) < 0.07 * head_r) * (np.abs(x - eye[0]) < 0.8 * head_r)
                    * (z > 0))
    tex = paint(tex, np.array([0.95, 0.93, 0.85]), side * (eye_d < 0.27 * head_r))
    tex = paint(tex, np.array([0.03, 0.03, 0.03]), side * (eye_d < 0.18 * head_r))
    tex = paint(tex, beak, _smoothstep(lm["beak_base_x"] + 0.01, lm["beak_base_x"] + 0.04, x) * np.ones_like(cos_phi))
    feathers = 1 + 0.08 * rng.standard_normal((rows, cols // 2, 1))
    feathers = np.concatenate([feathers, feathers[:, ::-1]], axis=1)  # mirror-symmetric noise
    return np.clip(tex * feathers, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- cameras


MAX_CAMERA_ROUNDS = 100
FRAMING_STEPS = 12
FRAME_LIMIT = 0.98
"""Every vertex of an accepted camera projects inside [-FRAME_LIMIT, FRAME_LIMIT]^2 NDC."""


def _framing_residual(verts: torch.Tensor, azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor,
                      params: torch.Tensor, target_half: torch.Tensor) -> torch.Tensor:
    """(N, 3): the projected bounding box's centre (x, y) and its longer half side minus ``target_half``,
    in NDC, for cameras ``params`` = (distance, offset_x, offset_y) (N, 3)."""
    proj = perspective_projection(FOVY_RAD, 1.0, dtype=verts.dtype)
    transform = camera_transform(azimuth_deg, elevation_deg, params[:, 0], params[:, 1:])
    ndc = project(world_to_camera(verts, transform), proj)
    lo, hi = ndc.amin(1), ndc.amax(1)
    half = ((hi - lo) / 2).amax(-1)
    return torch.cat([(lo + hi) / 2, (half - target_half)[:, None]], dim=1)


def frame_cameras(verts: torch.Tensor, azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor, margin: torch.Tensor,
                  distance_range: tuple[float, float], offset_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance and look-at offset that frame each mesh like a CUB crop, as far as the ranges allow.

    Damped Gauss-Newton (forward-difference Jacobian) on the residual of `_framing_residual`, with the
    distance clamped to ``distance_range`` and the offset to ``[-offset_range, offset_range]^2`` after
    every step: a view that needs a nearer camera keeps the nearest allowed distance (a larger
    margin), and a view along the bird, where the offset can hardly move the box sideways, stays a
    little off centre, as loosely cropped photographs are.

    Args:
        verts: (N, V, 3) meshes; azimuth_deg, elevation_deg: (N,) degrees.
        margin: (N,) crop margin on each side, in units of the bounding box's longer side.
    Returns:
        distance (N,) and offset (N, 2), float64.
    """
    verts, azimuth_deg, elevation_deg = verts.double(), azimuth_deg.double(), elevation_deg.double()
    target = 1.0 / (1.0 + 2.0 * margin.double())
    lower = torch.tensor([distance_range[0], -offset_range, -offset_range], dtype=torch.float64)
    upper = torch.tensor([distance_range[1], offset_range, offset_range], dtype=torch.float64)
    params = torch.zeros(len(verts), 3, dtype=torch.float64)
    params[:, 0] = 3.0
    damping = torch.diag(torch.tensor([0.0, 1e-3, 1e-3], dtype=torch.float64))
    eps = 1e-4
    for _ in range(FRAMING_STEPS):
        residual = _framing_residual(verts, azimuth_deg, elevation_deg, params, target)
        jac = torch.stack([(_framing_residual(verts, azimuth_deg, elevation_deg, params + eps * e, target) - residual)
                           / eps for e in torch.eye(3, dtype=torch.float64)], dim=-1)  # (N, 3 residuals, 3 params)
        jt = jac.transpose(1, 2)
        step = torch.linalg.solve(jt @ jac + damping, -(jt @ residual[..., None]))[..., 0]
        params = torch.maximum(torch.minimum(params + step, upper), lower)
    return params[:, 0], params[:, 1:]


@dataclass(frozen=True)
class BirdsConfig:
    """Generation parameters; the cache is reused only when all of them match its manifest.

    Images are square, ``image_size`` pixels; angles in degrees, distances and offsets in world units.
    """

    num_train: int
    num_test: int
    image_size: int
    seed: int
    num_classes: int = 8
    elevation_range: tuple[float, float] = (0.0, 30.0)
    distance_range: tuple[float, float] = (2.0, 7.0)
    offset_range: float = 0.3
    margin_range: tuple[float, float] = (0.05, 0.15)
    spp: int = 16

    def __post_init__(self):
        if self.num_train < 1 or self.num_test < 1:
            raise ValueError(f"need at least one train and one test image, got {self.num_train}, {self.num_test}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.distance_range[0] <= 1.0 or self.distance_range[0] > self.distance_range[1]:
            raise ValueError(f"distance_range must be 'lo <= hi' with lo > 1, got {self.distance_range}")
        if self.elevation_range[0] > self.elevation_range[1] or max(map(abs, self.elevation_range)) >= 90:
            raise ValueError(f"elevation_range must be 'lo <= hi' inside (-90, 90), got {self.elevation_range}")
        if self.num_classes < 1 or self.spp < 1:
            raise ValueError(f"num_classes and spp must be >= 1, got {self.num_classes}, {self.spp}")

    def manifest(self) -> dict:
        """JSON-ready parameters, tagged with the cache format version. The cache's manifest also
        records the Mitsuba version that rendered it, which is not compared (see `ensure_birds`)."""
        return json.loads(json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}))


def random_cameras(verts: np.ndarray, config: BirdsConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """CUB-like framings (see the module docstring) inside the configured ranges.

    Args:
        verts: (N, V, 3) meshes.
    Returns:
        ``azimuth_deg``, ``elevation_deg``, ``distance`` (N,), ``offset`` (N, 2), float32.
    Raises:
        RuntimeError when some bird cannot be framed within the ranges.
    """
    n = len(verts)
    out = {"azimuth_deg": np.zeros(n, np.float32), "elevation_deg": np.zeros(n, np.float32),
           "distance": np.zeros(n, np.float32), "offset": np.zeros((n, 2), np.float32)}
    pending = np.arange(n)
    proj = perspective_projection(FOVY_RAD, 1.0, dtype=torch.float64)
    for _ in range(MAX_CAMERA_ROUNDS):
        k = len(pending)
        draw = {"azimuth_deg": torch.from_numpy(180.0 - 360.0 * rng.random(k)),
                "elevation_deg": torch.from_numpy(rng.uniform(*config.elevation_range, size=k))}
        margin = torch.from_numpy(rng.uniform(*config.margin_range, size=k))
        mesh = torch.from_numpy(verts[pending]).double()
        # Every third vertex frames the bird well enough (the margin is random anyway); the check
        # below uses them all.
        draw["distance"], draw["offset"] = frame_cameras(mesh[:, ::3], draw["azimuth_deg"], draw["elevation_deg"],
                                                         margin, config.distance_range, config.offset_range)
        draw = {key: value.float().double() for key, value in draw.items()}  # the float32 camera that is stored
        verts_cam = world_to_camera(mesh, camera_transform(*draw.values()))
        ok = ((project(verts_cam, proj).abs() <= FRAME_LIMIT).flatten(1).all(1) & (verts_cam[..., 2] < -0.1).all(1))
        for key, value in draw.items():
            out[key][pending[ok.numpy()]] = value[ok].numpy()
        pending = pending[~ok.numpy()]
        if len(pending) == 0:
            return out
    raise RuntimeError(f"no camera in the given ranges frames {len(pending)} of the birds: widen distance_range "
                       "or offset_range")


# ----------------------------------------------------------------------------- rendering


def _vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) area-weighted unit vertex normals of the welded mesh."""
    tri = verts[faces]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals = np.zeros_like(verts)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_n)
    return normals / np.linalg.norm(normals, axis=1, keepdims=True).clip(1e-12)


def _render_mesh_arrays(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, ...]:
    """The welded tube as the renderer gets it: the phi = 0 column and each tip duplicated so the
    texture coordinates need not wrap. Returns positions, normals, uvs and faces of that mesh."""
    n, rings = NUM_AROUND, NUM_RINGS
    normals = _vertex_normals(verts, faces)
    ring_ids = 2 + np.arange(rings)[:, None] * n + np.arange(n + 1)[None] % n  # (R, n + 1)
    v_ring = ring_parameters()  # the texture's rows run along t (see `plumage`)
    u_ring = np.arange(n + 1) / n
    uv_ring = np.stack(np.broadcast_arrays(u_ring[None], v_ring[:, None]), -1).reshape(-1, 2)
    tip_ids = np.repeat([0, 1], n)
    uv_tips = np.stack([np.tile((np.arange(n) + 0.5) / n, 2), np.repeat([0.0, 1.0], n)], -1)
    src = np.concatenate([ring_ids.reshape(-1), tip_ids])
    uvs = np.concatenate([uv_ring, uv_tips])

    def idx(ring, j):  # index of ring vertex j (j = n is the duplicated phi = 2 pi column)
        return ring * (n + 1) + j

    j = np.arange(n)
    tris = []
    for r in range(rings - 1):
        a, b, c, d = idx(r, j), idx(r, j + 1), idx(r + 1, j), idx(r + 1, j + 1)
        tris += [np.stack([a, b, c], 1), np.stack([b, d, c], 1)]
    tail, beak = rings * (n + 1) + j, rings * (n + 1) + n + j
    tris.append(np.stack([tail, idx(0, j + 1), idx(0, j)], 1))
    tris.append(np.stack([beak, idx(rings - 1, j), idx(rings - 1, j + 1)], 1))
    return verts[src], normals[src], uvs, np.concatenate(tris)


def _srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def render_bird(verts: np.ndarray, faces: np.ndarray, texture: np.ndarray, camera: dict[str, float],
                light_direction: np.ndarray, irradiance: float, ambient: float, size: int, spp: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Path-trace one bird with Mitsuba 3 (CPU, ``scalar_rgb``) through our camera.

    Args:
        verts: (V, 3) object-frame mesh, faces (F, 3) (`tube_faces`); texture: `plumage`.
        camera: ``azimuth_deg``, ``elevation_deg``, ``distance``, ``offset_x``, ``offset_y``.
        light_direction: (3,) unit direction the light travels in; irradiance, ambient: intensities.
        size: image width = height in pixels; spp: samples per pixel; seed: of the sampler.
    Returns:
        linear RGB (size, size, 3) float32 and alpha (size, size) float32 in [0, 1] (pixel coverage).
    """
    import mitsuba as mi

    mi.set_variant("scalar_rgb")
    positions, normals, uvs, tris = _render_mesh_arrays(verts, faces)
    bsdf = mi.load_dict({"type": "diffuse", "reflectance": {
        "type": "bitmap", "bitmap": mi.Bitmap(_srgb_to_linear(texture).astype(np.float32)),
        "raw": True, "filter_type": "bilinear", "wrap_mode": "clamp"}})
    props = mi.Properties()
    props["bsdf"] = bsdf
    mesh = mi.Mesh("bird", len(positions), len(tris), props=props, has_vertex_normals=True, has_vertex_texcoords=True)
    params = mi.traverse(mesh)
    for key, value in (("vertex_positions", positions), ("vertex_normals", normals), ("vertex_texcoords", uvs),
                       ("faces", tris)):
        buffer_type = type(params[key])  # the variant's dynamic array type
        params[key] = buffer_type(value.astype(np.uint32 if key == "faces" else np.float32).ravel())
    params.update()
    eye = camera_position(*(torch.tensor([camera[key]], dtype=torch.float64)
                            for key in ("distance", "elevation_deg", "azimuth_deg")))[0]
    scene = mi.load_dict({
        "type": "scene",
        "integrator": {"type": "direct"},
        "sensor": {
            "type": "perspective", "fov_axis": "y", "fov": math.degrees(FOVY_RAD), "near_clip": 0.05,
            "to_world": mi.ScalarTransform4f().look_at(origin=eye.tolist(),
                                                       target=[camera["offset_x"], camera["offset_y"], 0.0],
                                                       up=[0.0, 1.0, 0.0]),
            "film": {"type": "hdrfilm", "width": size, "height": size, "rfilter": {"type": "box"},
                     "pixel_format": "rgba"},
            "sampler": {"type": "independent", "sample_count": spp},
        },
        "bird": mesh,
        "sun": {"type": "directional", "direction": light_direction.tolist(),
                "irradiance": {"type": "rgb", "value": [irradiance] * 3}},
        "sky": {"type": "constant", "radiance": {"type": "rgb", "value": [ambient] * 3}},
    })
    image = np.array(mi.render(scene, spp=spp, seed=seed), dtype=np.float32)
    return image[..., :3], image[..., 3]


# ----------------------------------------------------------------------------- images

NATURE = np.array([[0.45, 0.6, 0.8], [0.75, 0.85, 0.95], [0.25, 0.4, 0.15], [0.45, 0.55, 0.25], [0.4, 0.3, 0.2],
                   [0.6, 0.55, 0.45], [0.55, 0.6, 0.55], [0.15, 0.2, 0.1]])
"""sRGB colours the backgrounds are mixed from: skies, foliage, bark, stone."""


def random_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 sRGB: a vertical gradient of two natural colours, soft blotches and 0-3
    blurred twigs (background clutter that is not part of the mask)."""
    from PIL import ImageDraw, ImageFilter

    top, bottom = NATURE[rng.integers(len(NATURE), size=2)] + rng.normal(0, 0.05, (2, 3))
    t = np.linspace(0, 1, size)[:, None, None]
    image = top * (1 - t) + bottom * t
    blotches = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    blotches = np.asarray(blotches, np.float32) / 255 - 0.5
    image = image + rng.uniform(0.05, 0.2) * (0.3 * blotches + 0.7 * blotches.mean(-1, keepdims=True))
    canvas = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, 4)):
        colour = tuple(int(c) for c in (NATURE[rng.choice([4, 7])] * rng.uniform(0.5, 1.0) * 255))
        (x0, y0), (x1, y1) = rng.uniform(-0.2, 1.2, (2, 2)) * size
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=max(1, int(rng.uniform(0.01, 0.05) * size)))
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 2.0) * size / 128))
    return np.asarray(canvas, np.float32) / 255


def random_light(azimuth_deg: float, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """A sun from the camera's side of the upper hemisphere: (direction the light travels (3,), irradiance,
    ambient radiance)."""
    az = math.radians(azimuth_deg + rng.uniform(-80, 80))
    el = math.radians(rng.uniform(25, 75))
    towards_light = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    return -towards_light, float(rng.uniform(2.5, 4.0)), float(rng.uniform(0.15, 0.35))


def compose(rgb_linear: np.ndarray, alpha: np.ndarray, background: np.ndarray, noise: float,
            rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: the render (sRGB) over the background by its alpha, plus Gaussian noise ``noise``."""
    a = alpha[..., None]
    image = _linear_to_srgb(rgb_linear / np.maximum(a, 1e-6)) * a + background * (1 - a)
    image = image + rng.normal(0.0, noise, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- generation


def _split_rng(seed: int, split: str) -> np.random.Generator:
    # Separate streams per split, so the test images do not depend on num_train.
    return np.random.default_rng([seed, SPLITS.index(split) + 1])


def generate_split(root: Path, split: str, config: BirdsConfig, species: list[BirdSpecies]) -> None:
    """Render and write one split (images, masks, ``gt.npz``) under ``root/split``."""
    n = config.num_train if split == "train" else config.num_test
    rng = _split_rng(config.seed, split)
    labels = np.arange(n) % config.num_classes
    instances = [species[label].instance(rng) for label in labels]
    faces = tube_faces()
    verts = np.stack([bird_mesh(bird_profile(sp))[0] for sp in instances]).astype(np.float32)
    cameras = random_cameras(verts, config, rng)
    stems = [f"{split}_{i:06d}" for i in range(n)]
    split_dir = root / split
    light_directions = np.zeros((n, 3), np.float32)
    for i in range(n):
        camera = {key: float(cameras[key][i]) for key in ("azimuth_deg", "elevation_deg", "distance")}
        camera["offset_x"], camera["offset_y"] = (float(v) for v in cameras["offset"][i])
        direction, irradiance, ambient = random_light(camera["azimuth_deg"], rng)
        light_directions[i] = direction
        rgb, alpha = render_bird(verts[i], faces, plumage(instances[i], rng), camera, direction, irradiance, ambient,
                                 config.image_size, config.spp, seed=i)
        image = compose(rgb, alpha, random_background(config.image_size, rng), rng.uniform(0.005, 0.03), rng)
        mask = alpha > 0.5
        folder = split_dir / f"{labels[i]:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{stems[i]}.jpg", quality=JPEG_QUALITY)
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / mask_file_name(stems[i], float(mask.mean())))
    np.savez(split_dir / GT_FILE, stems=np.array(stems), labels=labels, verts=verts, faces=faces,
             light_direction=light_directions, **cameras)


def ensure_birds(
    root: str | Path,
    num_train: int,
    num_test: int,
    image_size: int,
    seed: int,
    *,
    num_classes: int = 8,
    elevation_range: tuple[float, float] = (0.0, 30.0),
    distance_range: tuple[float, float] = (2.0, 7.0),
    offset_range: float = 0.3,
    spp: int = 16,
) -> Path:
    """Generate the bird dataset under ``root`` unless a cache with these parameters is there.

    Args:
        root: cache folder (default in the scripts: ``data/birds``).
        num_train, num_test: images per split.
        image_size: width = height of the images in pixels.
        seed: the dataset is a deterministic function of the parameters and the Mitsuba version. The
            manifest records that version, but a cache made by another version (or copied to a machine
            without Mitsuba, such as a GPU node) is reused as it is: only the parameters must match.
        num_classes: species (class folders / labels).
        elevation_range, distance_range: camera ranges (degrees, world units), min <= max.
        offset_range: look-at offsets stay in [-offset_range, offset_range]^2.
        spp: path-tracing samples per pixel.
    Returns:
        ``root`` as a Path. A cache made with other parameters is replaced (its ``train/``, ``test/``
        and manifest are deleted first); the manifest is written last, so an interrupted generation
        is redone on the next call.
    """
    root = Path(root)
    config = BirdsConfig(num_train, num_test, image_size, seed, num_classes, tuple(map(float, elevation_range)),
                         tuple(map(float, distance_range)), float(offset_range), spp=spp)
    start = time.perf_counter()

    def generate() -> dict:
        import mitsuba

        species_rng = np.random.default_rng([seed, 0])
        species = [BirdSpecies.draw(species_rng) for _ in range(num_classes)]
        for split in SPLITS:
            generate_split(root, split, config, species)
        return {"mitsuba": mitsuba.__version__}

    if not ensure_cache(root, config.manifest(), generate):
        return root
    logger.info("birds: generated %d + %d images of %dx%d in %s in %.1f s", num_train, num_test, image_size,
                image_size, root, time.perf_counter() - start)
    return root


# ----------------------------------------------------------------------------- loader


class BirdsDataset(GroundTruthDataset):
    """The bird cache through the CUB loader (JPEG images, binary masks, ``len = N``).

    Args:
        root: cache folder made by `ensure_birds`.
        split, image_size, threshold, aug, bg: as `datasets.cub.CUBDataset`; another ``image_size``
            than the cache's is a resize of the whole square frame, so the cameras stay exact.
        ratio: must be 1 (the images are square).
        original_crop, train_repeats: as `datasets.cub.CUBDataset`, whose default doubling of the train
            split (the original's CUB loader) applies here too.
    Items: CUB items (label = species) plus, when ``aug`` is False, the ground truth (`GT_KEYS`).
    """

    def __init__(self, root: str | Path, split: str, image_size: int = 128, ratio: float = 1.0,
                 threshold: str | tuple[float, float] | None = None, aug: bool = False, bg: bool = False,
                 original_crop: bool = False, train_repeats: int = TRAIN_REPEATS):
        root = Path(root)
        if read_manifest(root) is None:
            raise FileNotFoundError(f"no bird dataset at {root} ({MANIFEST} missing): {HINT}")
        if not math.isclose(ratio, 1.0):
            raise ValueError(f"the bird images are square: use --ratio 1, not {ratio}")
        super().__init__(root, split, image_size, ratio, threshold, aug, bg, gt_keys=GT_KEYS, image_ext=".jpg",
                         mask_threshold=0, name="birds", hint=HINT, original_crop=original_crop,
                         train_repeats=train_repeats)

    def mesh(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ground-truth mesh of sample ``position``: verts (V, 3) float32 and faces (F, 3) int64."""
        gt = np.load(Path(self.samples[position].rgb_path).parents[1] / GT_FILE)
        row = self.gt_row[self.samples[position].rgb_path.stem]
        return torch.from_numpy(gt["verts"][row]), torch.from_numpy(gt["faces"])
