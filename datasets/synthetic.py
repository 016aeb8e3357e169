"""Synthetic dataset: textured, front/back-symmetric smooth shapes with known mesh and camera.

Each image is a deformation of the ellipsoid template (`renderer.mesh.Template`), textured with a
smooth colour field, lit by SH coefficients near (3, 0, ..., 0) and rendered by `renderer.render.render`
from a random camera in the ranges the model predicts. It is the embedded default for the quick
start and the smoke tests, and the only data with 3-D ground truth.

Generation (`ensure_synthetic`), deterministic from the seed on a given device (CPU by default):

* shapes: ``num_classes`` families; family k has three pairs of Gaussian radial bumps, each pair
  mirrored through z = 0 (centres ``c`` and ``c * (1, 1, -1)``), and per-axis scales; every image
  jitters its family's amplitudes and scales. Every family shares a body plan ``h`` (`BODY_PLAN`: a
  head at +x, a tail at -x) that fixes the object's front. Vertices are
  ``T * scale * exp(sum_j a_j b_j(n) + h(n))`` with ``n`` the template direction, centred in x and
  y, shrunk to the template's extent (|x|, |y| <= 0.9) and kept within 0.45 of the template per
  coordinate (reachable by the model's 0.5·tanh offsets); the mesh is exactly z-symmetric
  (``verts[flip_index] == verts * (1, 1, -1)``) and smooth;
* textures: (3, 2H, W) like the model's, the upper half a smooth blend of two random colours, the
  lower half its vertical mirror (so front and back read the same texels, as in the model);
* light: ``L0 = 3 + U(-0.25, 0.25)``, ``L1..L8 = U(-0.1, 0.1)`` (inside the light encoder's range);
* camera: azimuth U(-180, 180], elevation, distance and look-at offset uniform in the given ranges
  (CUB defaults 0~30 degrees, 2~7, +-0.3), redrawn until every vertex projects inside
  [-0.9, 0.9] NDC, so the object stays in the frame (the kept distances lean to the far end);
* background: white, or a vertical gradient between two light colours (``background="gradient"``).

Cache layout, the CUB layout so that `datasets.cub.CUBDataset` is the loader's code path::

    <root>/manifest.json                       the generation parameters (written last)
    <root>/{train,test}/<class>/<stem>.png     RGB, 8-bit PNG (lossless: the loader reads exactly
                                               what was rendered, quantised to 1/255)
    <root>/{train,test}/<class>/<stem>_<r>.png binary mask (hard coverage), r = foreground ratio
    <root>/{train,test}/gt.npz                 ground truth, one row per image (see `GT_KEYS`)

Items are CUB items plus, without augmentation (augmentation would invalidate them), the ground
truth: ``"verts"`` (V, 3) float32 object frame, ``"azimuth_deg"``, ``"elevation_deg"``,
``"distance"`` (0-d float32), ``"offset"`` (2,) float32, ``"light"`` (9,) float32. At the stored size
re-rendering the ground truth reproduces the stored mask.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from datasets.common import mask_file_name
from datasets.cub import CUBDataset
from renderer.camera import FOVY_RAD, camera_transform, perspective_projection, project, world_to_camera
from renderer.mesh import Template
from renderer.render import render
from utils.cli import RunError

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
MANIFEST = "manifest.json"
GT_FILE = "gt.npz"
GT_KEYS = ("verts", "azimuth_deg", "elevation_deg", "distance", "offset", "light")
"""Per-image ground-truth arrays in ``gt.npz`` (besides ``stems`` and ``labels``) and item keys."""
FORMAT_VERSION = 2
NDC_LIMIT = 0.9
"""Every vertex of an accepted camera projects inside [-NDC_LIMIT, NDC_LIMIT]^2."""
NEAR = 0.1
"""Every vertex of an accepted camera is at least this far in front of it."""
MAX_CAMERA_ROUNDS = 1000
NUM_BUMPS = 3
BODY_PLAN = (
    # (direction in the symmetry plane z = 0, width, log-radius amplitude): a raised head at +x and a
    # smaller tail at -x, shared by every family, as birds share theirs. Without an asymmetry along x
    # the azimuth can hardly be read from an image, even by a supervised camera encoder
    # (bench/synthetic_camera.py).
    ((0.75, 0.6, 0.0), 0.3, 0.55),
    ((-1.0, 0.15, 0.0), 0.3, 0.3),
)
MAX_OFFSET = 0.45
"""Largest per-coordinate vertex offset from the template (the shape encoder reaches 0.5 tanh)."""
HINT = "generate it with datasets.synthetic.ensure_synthetic (`python train.py --dataset synthetic` does)"


@dataclass(frozen=True)
class SyntheticConfig:
    """Generation parameters; the cache is reused only when all of them match its manifest.

    Sizes: W = image_size, H = round(ratio * W). Angles in degrees, distances and offsets in world
    units.
    """

    num_train: int
    num_test: int
    image_size: int
    ratio: float
    seed: int
    ellipsoid: float = 1.0
    elevation_range: tuple[float, float] = (0.0, 30.0)
    distance_range: tuple[float, float] = (2.0, 7.0)
    offset_range: float = 0.3
    background: Literal["white", "gradient"] = "white"
    num_classes: int = 4

    def __post_init__(self):
        if self.num_train < 1 or self.num_test < 1:
            raise ValueError(f"need at least one train and one test image, got {self.num_train}, {self.num_test}")
        if self.image_size < 8 or self.ratio <= 0:
            raise ValueError(f"image_size must be >= 8 and ratio > 0, got {self.image_size}, {self.ratio}")
        if self.distance_range[0] <= 1.0 or self.distance_range[0] > self.distance_range[1]:
            raise ValueError(f"distance_range must be 'lo <= hi' with lo > 1, got {self.distance_range}")
        if self.elevation_range[0] > self.elevation_range[1] or max(map(abs, self.elevation_range)) >= 90:
            raise ValueError(f"elevation_range must be 'lo <= hi' inside (-90, 90), got {self.elevation_range}")
        if self.background not in ("white", "gradient"):
            raise ValueError(f"background must be 'white' or 'gradient', got {self.background!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    @property
    def width(self) -> int:
        return self.image_size

    @property
    def height(self) -> int:
        return round(self.ratio * self.image_size)

    def manifest(self) -> dict:
        """JSON-ready parameters, tagged with the cache format version."""
        return {"format_version": FORMAT_VERSION, **asdict(self)}


# ----------------------------------------------------------------------------- random scenes


def _uniform(generator: torch.Generator, shape, low, high) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _unit_vectors(generator: torch.Generator, shape) -> Tensor:
    v = torch.randn((*shape, 3), generator=generator)
    return v / v.norm(dim=-1, keepdim=True)


@dataclass(frozen=True)
class ShapeFamilies:
    """Per family: bump centres (K, J, 3) unit, widths (K, J), amplitudes (K, J), axis scales (K, 3)."""

    centres: Tensor
    widths: Tensor
    amplitudes: Tensor
    scales: Tensor

    @classmethod
    def draw(cls, num_classes: int, generator: torch.Generator) -> ShapeFamilies:
        shape = (num_classes, NUM_BUMPS)
        return cls(
            centres=_unit_vectors(generator, shape),
            widths=_uniform(generator, shape, 0.35, 0.7),
            amplitudes=_uniform(generator, shape, -0.3, 0.4),
            scales=torch.cat([_uniform(generator, (num_classes, 2), 0.6, 1.0),
                              _uniform(generator, (num_classes, 1), 0.7, 1.3)], dim=1),
        )


def body_plan(directions: Tensor) -> Tensor:
    """(V,) log-radius field of `BODY_PLAN` at unit ``directions`` (V, 3); z-symmetric by construction."""
    field = torch.zeros(len(directions))
    for centre, width, amplitude in BODY_PLAN:
        c = torch.tensor(centre)
        c = c / c.norm()
        field += amplitude * torch.exp(-((directions - c) ** 2).sum(-1) / (2 * width**2))
    return field


def random_shapes(template_verts: Tensor, families: ShapeFamilies, labels: Tensor,
                  generator: torch.Generator) -> Tensor:
    """Smooth, z-symmetric deformations of the template, one per label.

    Args:
        template_verts: (V, 3) float32, z-symmetric template.
        families: the shape families; ``labels`` (N,) int64 index them.
        generator: source of the per-image jitter (amplitude +-0.1, scale +-0.05).
    Returns:
        (N, V, 3) float32 vertices: centred in x and y, |x|, |y| <= 0.9, and within `MAX_OFFSET` of the
        template per coordinate (the offset field is scaled down uniformly where needed).
    """
    n = len(labels)
    directions = template_verts / template_verts.norm(dim=-1, keepdim=True)  # (V, 3)
    mirror = torch.tensor([1.0, 1.0, -1.0])
    centres = families.centres[labels]  # (N, J, 3)
    widths = families.widths[labels][:, None]  # (N, 1, J)
    amplitudes = families.amplitudes[labels] + _uniform(generator, (n, NUM_BUMPS), -0.1, 0.1)
    scales = families.scales[labels] + _uniform(generator, (n, 3), -0.05, 0.05)

    def bump(c: Tensor) -> Tensor:  # (N, V, J)
        dist2 = ((directions[None, :, None, :] - c[:, None, :, :]) ** 2).sum(-1)
        return torch.exp(-dist2 / (2 * widths**2))

    bumps = bump(centres) + bump(centres * mirror)
    radius = torch.exp((bumps * amplitudes[:, None, :]).sum(-1) + body_plan(directions))  # (N, V)
    verts = template_verts[None] * scales[:, None, :] * radius[..., None]
    xy = verts[..., :2] - verts[..., :2].mean(dim=1, keepdim=True)
    verts = torch.cat([xy, verts[..., 2:]], dim=-1)
    extent = verts[..., :2].abs().amax(dim=(1, 2)).clamp(min=0.9)
    offsets = verts * (0.9 / extent)[:, None, None] - template_verts
    largest = offsets.abs().amax(dim=(1, 2)).clamp(min=MAX_OFFSET)
    return template_verts + offsets * (MAX_OFFSET / largest)[:, None, None]


def random_textures(n: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """(N, 3, 2H, W) textures in [0, 1]: smooth two-colour fields stacked with their vertical mirror."""
    colours = _uniform(generator, (n, 2, 3, 1, 1), 0.1, 0.95)
    field = F.interpolate(torch.rand((n, 1, 4, 4), generator=generator), size=(height, width),
                          mode="bicubic", align_corners=True).clamp(0.0, 1.0)
    half = colours[:, 0] * (1.0 - field) + colours[:, 1] * field
    return torch.cat([half, half.flip(2)], dim=2)


def random_lights(n: int, generator: torch.Generator) -> Tensor:
    """(N, 9) SH coefficients: L0 in [2.75, 3.25], the others in [-0.1, 0.1]."""
    light = _uniform(generator, (n, 9), -0.1, 0.1)
    light[:, 0] = _uniform(generator, (n,), 2.75, 3.25)
    return light


def random_backgrounds(n: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """(N, 3, H, W) vertical gradients between two light colours in [0.6, 1]."""
    top, bottom = _uniform(generator, (2, n, 3, 1, 1), 0.6, 1.0)
    t = torch.linspace(0.0, 1.0, height).view(1, 1, height, 1)
    return (top * (1 - t) + bottom * t).expand(n, 3, height, width).contiguous()


def random_cameras(verts: Tensor, config: SyntheticConfig, generator: torch.Generator) -> dict[str, Tensor]:
    """Uniform cameras in the configured ranges under which the whole mesh is in the frame.

    Args:
        verts: (N, V, 3) meshes.
    Returns:
        ``azimuth_deg``, ``elevation_deg``, ``distance`` (N,) and ``offset`` (N, 2), float32.
    Raises:
        RuntimeError if some mesh cannot be framed (ranges too tight for the object size).
    """
    n = len(verts)
    proj = perspective_projection(FOVY_RAD, config.width / config.height)
    cameras = {"azimuth_deg": torch.empty(n), "elevation_deg": torch.empty(n), "distance": torch.empty(n),
               "offset": torch.empty(n, 2)}
    pending = torch.arange(n)
    for _ in range(MAX_CAMERA_ROUNDS):
        k = len(pending)
        draw = {
            "azimuth_deg": 180.0 - 360.0 * torch.rand(k, generator=generator),  # (-180, 180]
            "elevation_deg": _uniform(generator, (k,), *config.elevation_range),
            "distance": _uniform(generator, (k,), *config.distance_range),
            "offset": _uniform(generator, (k, 2), -config.offset_range, config.offset_range),
        }
        transform = camera_transform(draw["azimuth_deg"], draw["elevation_deg"], draw["distance"], draw["offset"])
        verts_cam = world_to_camera(verts[pending], transform)
        ndc = project(verts_cam, proj)
        ok = (ndc.abs() <= NDC_LIMIT).flatten(1).all(1) & (verts_cam[..., 2] < -NEAR).all(1)
        for key, value in draw.items():
            cameras[key][pending[ok]] = value[ok]
        pending = pending[~ok]
        if len(pending) == 0:
            return cameras
    raise RunError(f"no camera in the given ranges frames {len(pending)} of the meshes: widen "
                       "distance_range or shrink offset_range")


# ----------------------------------------------------------------------------- generation


def _split_generator(seed: int, split: str) -> torch.Generator:
    # Separate streams per split, so the test images do not depend on num_train.
    return torch.Generator().manual_seed(seed * len(SPLITS) + SPLITS.index(split) + 1)


def generate_split(root: Path, split: str, config: SyntheticConfig, template: Template,
                   families: ShapeFamilies, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
    """Render and write one split (images, masks, ``gt.npz``) under ``root/split``."""
    n = config.num_train if split == "train" else config.num_test
    generator = _split_generator(config.seed, split)
    labels = torch.arange(n) % config.num_classes
    verts = random_shapes(template.verts, families, labels, generator)
    cameras = random_cameras(verts, config, generator)
    light = random_lights(n, generator)
    textures = random_textures(n, config.height, config.width, generator)
    backgrounds = (random_backgrounds(n, config.height, config.width, generator)
                   if config.background == "gradient" else None)
    stems = [f"{split}_{i:06d}" for i in range(n)]
    split_dir = root / split
    for label in range(config.num_classes):
        (split_dir / f"{label:03d}").mkdir(parents=True, exist_ok=True)
    faces, face_uvs = template.faces.to(device), template.face_uvs.to(device)
    for start in range(0, n, batch_size):
        part = slice(start, min(start + batch_size, n))
        with torch.no_grad():
            out = render(
                verts[part].to(device), faces, face_uvs,
                *(cameras[k][part].to(device) for k in ("azimuth_deg", "elevation_deg", "distance", "offset")),
                textures[part].to(device), light[part].to(device), config.height, config.width,
                background=None if backgrounds is None else backgrounds[part].to(device),
            )
        rgb = (out.rgb.permute(0, 2, 3, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
        masks = (out.face_idx >= 0).cpu().numpy()
        for i, image, mask in zip(range(part.start, part.stop), rgb, masks, strict=True):
            folder = split_dir / f"{int(labels[i]):03d}"
            Image.fromarray(image).save(folder / f"{stems[i]}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / mask_file_name(stems[i], float(mask.mean())))
    np.savez(split_dir / GT_FILE, stems=np.array(stems), labels=labels.numpy(), verts=verts.numpy(),
             light=light.numpy(), **{k: v.numpy() for k, v in cameras.items()})


def read_manifest(root: Path) -> dict | None:
    """The cache's manifest, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def ensure_cache(root: Path, wanted: dict, generate: Callable[[], dict]) -> bool:
    """Fill the cache folder `root` with `generate()` unless its manifest already holds every entry of
    `wanted` (the generation parameters, JSON-ready).

    A cache made with other parameters is deleted first (its split folders and manifest).
    `generate()` writes the splits and returns entries to record beside `wanted` that are not compared
    (such as a renderer's version). The manifest is written last and atomically, so an interrupted
    generation is redone on the next call. Returns True when it generated.
    """
    found = read_manifest(root)
    if found is not None and all(k in found and found[k] == v for k, v in wanted.items()):
        return False
    (root / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    recorded = generate()
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({**wanted, **recorded}, indent=1))
    tmp.replace(root / MANIFEST)
    return True


def ensure_synthetic(
    root: str | Path,
    num_train: int,
    num_test: int,
    image_size: int,
    ratio: float,
    seed: int,
    *,
    ellipsoid: float = 1.0,
    elevation_range: tuple[float, float] = (0.0, 30.0),
    distance_range: tuple[float, float] = (2.0, 7.0),
    offset_range: float = 0.3,
    background: Literal["white", "gradient"] = "white",
    num_classes: int = 4,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> Path:
    """Generate the synthetic dataset under ``root`` unless a cache with these parameters is there.

    Args:
        root: cache folder (default in the scripts: ``data/synthetic``).
        num_train, num_test: images per split.
        image_size: width W in pixels; height H = round(ratio * W).
        ratio: H / W.
        seed: the dataset is a deterministic function of the parameters (on one device).
        ellipsoid: template squash (the model's ``--ellipsoid``).
        elevation_range, distance_range: camera ranges (degrees, world units), min <= max.
        offset_range: look-at offsets are uniform in [-offset_range, offset_range]^2.
        background: ``"white"`` or ``"gradient"``.
        num_classes: shape families (class folders / labels).
        device: where to render (CPU and CUDA images can differ in the last bit).
        batch_size: images per render call.
    Returns:
        ``root`` as a Path. A cache made with other parameters is replaced (its ``train/``,
        ``test/`` and manifest are deleted first); the manifest is written last, so an interrupted
        generation is redone on the next call.
    """
    root = Path(root)
    config = SyntheticConfig(num_train, num_test, image_size, ratio, seed, ellipsoid,
                             tuple(map(float, elevation_range)), tuple(map(float, distance_range)),
                             float(offset_range), background, num_classes)
    start = time.perf_counter()

    def generate() -> dict:
        template = Template.icosphere(ellipsoid=ellipsoid)
        families = ShapeFamilies.draw(num_classes, torch.Generator().manual_seed(seed))
        for split in SPLITS:
            generate_split(root, split, config, template, families, device=device, batch_size=batch_size)
        return {}

    if not ensure_cache(root, json.loads(json.dumps(config.manifest())), generate):
        return root
    logger.info("synthetic: generated %d + %d images of %dx%d in %s in %.1f s", num_train, num_test,
                config.width, config.height, root, time.perf_counter() - start)
    return root


# ----------------------------------------------------------------------------- loader


class GroundTruthDataset(CUBDataset):
    """A generated CUB-layout cache with a ``gt.npz`` per split, through the CUB loader.

    Items are CUB items plus, when ``aug`` is False (augmentation would invalidate them), the rows of
    ``gt.npz`` named by ``gt_keys``, matched to the image by its stem, as float32 tensors, and, where
    the split's meshes share one topology stored as ``faces`` (the birds), those (F, 3) int64 faces.

    Args:
        root, split, image_size, ratio, threshold, aug, bg: as `datasets.cub.CUBDataset`.
        gt_keys: the per-image arrays of ``gt.npz`` that items carry.
        image_ext, mask_threshold, name, hint, original_crop, train_repeats: as `datasets.cub.CUBDataset`
            (by default no doubling of the train split).
    """

    def __init__(self, root: str | Path, split: str, image_size: int, ratio: float,
                 threshold: str | tuple[float, float] | None, aug: bool, bg: bool, *, gt_keys: tuple[str, ...],
                 image_ext: str, mask_threshold: int, name: str, hint: str, original_crop: bool = False,
                 train_repeats: int = 1):
        super().__init__(root, split, image_size, ratio, threshold, aug, bg, original_crop=original_crop,
                         image_ext=image_ext, mask_threshold=mask_threshold, train_repeats=train_repeats, name=name,
                         hint=hint)
        gt = np.load(Path(root) / split / GT_FILE)
        self.gt = {key: torch.from_numpy(gt[key]).float() for key in gt_keys}
        self.gt_row = {str(stem): row for row, stem in enumerate(gt["stems"])}
        self.faces = torch.from_numpy(gt["faces"]).long() if "faces" in gt else None

    def load(self, position: int) -> dict:
        item = super().load(position)
        if not self.aug:
            row = self.gt_row[self.samples[position].rgb_path.stem]
            item.update({key: value[row] for key, value in self.gt.items()})
            if self.faces is not None:
                item["faces"] = self.faces
        return item


class SyntheticDataset(GroundTruthDataset):
    """The synthetic cache through the CUB loader (PNG images, masks binarised at > 0, ``len = N``).

    Args:
        root: cache folder made by `ensure_synthetic`.
        split, image_size, ratio, threshold, aug, bg, original_crop, train_repeats: as
            `datasets.cub.CUBDataset` (one visit per epoch by default). ``ratio`` must be the cache's;
            another ``image_size`` is resized like CUB (the ground-truth cameras stay valid, the
            stored-mask identity then holds only approximately).
    Items: CUB items (label = shape family) plus, when ``aug`` is False, the ground truth
    (`GT_KEYS`, see the module docstring).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int = 64,
        ratio: float = 1.0,
        threshold: str | tuple[float, float] | None = None,
        aug: bool = False,
        bg: bool = False,
        original_crop: bool = False,
        train_repeats: int = 1,
    ):
        root = Path(root)
        manifest = read_manifest(root)
        if manifest is None:
            raise FileNotFoundError(f"no synthetic dataset at {root} ({MANIFEST} missing): {HINT}")
        if not math.isclose(ratio, manifest["ratio"], rel_tol=1e-6):
            raise ValueError(f"synthetic dataset at {root} was made with ratio {manifest['ratio']}, asked for "
                             f"{ratio}: regenerate it with ensure_synthetic")
        super().__init__(root, split, image_size, ratio, threshold, aug, bg, gt_keys=GT_KEYS, image_ext=".png",
                         mask_threshold=0, name="synthetic", hint=HINT, original_crop=original_crop,
                         train_repeats=train_repeats)
