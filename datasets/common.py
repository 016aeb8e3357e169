"""Loading and transform helpers shared by every dataset (data-eval-vis.md §2.1).

On-disk conventions:

* Every mask is a PNG named ``<stem>_<r>.png`` where ``<r>`` is its foreground ratio with two
  decimals (``..._0.34.png``); the prepare scripts write these names. The ratio is parsed with a
  regular expression (the original read fixed character positions, so any other PNG in the tree
  broke loading); PNGs that do not match are not masks and are ignored with a logged count.
* A threshold window ``(lo, hi)`` keeps a sample iff ``lo < r < hi`` (strict on both sides).
* Masks are binarised on the 0..255 grey value: ``255 if value > t else 0`` with ``t = 160`` for CUB
  (soft annotator-vote masks) and ``t = 0`` for Market, ATR and the synthetic data.

Robustness policy (the same for every dataset, so nothing fails mid-epoch and no sample is silently
wrong):

* At construction, `MaskedImageDataset` subclasses list the files and run cheap header checks
  (file present, Pillow can identify it, RGB and mask sizes agree where the transform needs them to):
  a missing root raises `FileNotFoundError`, an empty split raises `ValueError`, and every other
  problem (image without mask or the reverse, unreadable header, size mismatch) is a counted skip,
  logged once with `logging` and kept in ``dataset.skipped`` (reason -> paths).
* At load time, a file that fails to decode (truncated, corrupt) or a mask with no foreground pixel
  is skipped: the item of the next index is returned instead, the skip is logged with its path and
  counted in ``dataset.load_skips`` (per process; DataLoader workers each count their own).

Items are flat dicts: ``{"images": (4, H, W) float32 in [0, 1] (RGB + binary mask), "path": str
(the RGB file), "label": int}``; the original's ``{"data": ...}`` wrapper is gone.

Randomness (augmentation) is drawn from torch's global generator, so ``torch.manual_seed`` (or
`utils.data.SeededItems`, which seeds it per item) makes every augmented item reproducible.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from utils.cli import RunError

logger = logging.getLogger(__name__)

MASK_NAME = re.compile(r"^(?P<stem>.+)_(?P<ratio>\d\.\d\d)\.png$")
"""Mask file names: ``<stem>_<ratio with two decimals>.png``."""

FINAL_MASK_THRESHOLD = 160
"""Grey level above which a resized mask pixel is foreground (a no-op on already binary masks)."""

PAD_PIXELS = 10
"""Black border added before the random crop / shift of the augmentation."""

IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
"""What Pillow raises for missing, unidentifiable, truncated or corrupt files."""

Window = tuple[float, float]
Fit = Literal["pad", "stretch"]
AugStyle = Literal["crop", "shift"]


class BadSampleError(Exception):
    """A sample that cannot be used (decode failure, empty mask); the dataset skips it."""


# ----------------------------------------------------------------------------- names and ratios


def parse_threshold(threshold: str | Sequence[float] | None) -> Window | None:
    """Foreground-ratio window from ``"lo,hi"`` (spaces ignored) or a pair; None means no filter.

    Raises ValueError with the expected format when the text does not parse or lo > hi.
    """
    if threshold is None:
        return None
    if isinstance(threshold, str):
        parts = threshold.replace(" ", "").split(",")
        try:
            lo, hi = (float(p) for p in parts)
        except ValueError:
            raise ValueError(f"threshold must be 'lo,hi' (e.g. '0.16,0.64'), got {threshold!r}") from None
    else:
        lo, hi = (float(v) for v in threshold)
    if lo > hi:
        raise ValueError(f"threshold window ({lo}, {hi}) has lo > hi")
    return lo, hi


def in_window(ratio: float, window: Window | None) -> bool:
    """True iff ``lo < ratio < hi`` (strict), or when there is no window."""
    return window is None or window[0] < ratio < window[1]


def mask_file_name(stem: str, ratio: float) -> str:
    """``<stem>_<ratio:.2f>.png``, the mask name the loaders parse back."""
    return f"{stem}_{ratio:.2f}.png"


def split_mask_name(name: str) -> tuple[str, float] | None:
    """``(stem, ratio)`` of a mask file name, or None if the name has no ratio suffix."""
    match = MASK_NAME.match(name)
    if match is None:
        return None
    return match["stem"], float(match["ratio"])


def binarize(mask: Image.Image, threshold: int) -> Image.Image:
    """Grey-scale copy of ``mask`` with 255 where the 0..255 grey value is > threshold, else 0."""
    return mask.convert("L").point(lambda v: 255 if v > threshold else 0)


def foreground_ratio(mask: Image.Image, threshold: int = 0) -> float:
    """Fraction of pixels whose grey value is > threshold, in [0, 1]."""
    grey = np.asarray(mask.convert("L"))
    return float((grey > threshold).mean())


def load_rgb(path: Path) -> Image.Image:
    """Fully decoded RGB image (grey or palette files are converted); raises on a bad file."""
    with Image.open(path) as image:
        return image.convert("RGB")


def load_mask(path: Path, threshold: int) -> Image.Image:
    """Fully decoded mask binarised to {0, 255} (mode ``L``) at ``threshold``; raises on a bad file."""
    with Image.open(path) as image:
        return binarize(image, threshold)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header only; raises one of `IMAGE_ERRORS` on a bad file."""
    with Image.open(path) as image:
        return image.size


# ----------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    """One RGB / mask pair; ``ratio`` is the foreground ratio written in the mask name."""

    rgb_path: Path
    mask_path: Path
    ratio: float
    label: int


class SkipLog:
    """Counted skips by reason, logged once per reason with a few example paths."""

    def __init__(self, dataset_name: str):
        self.dataset_name = dataset_name
        self.paths: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, path: Path | str) -> None:
        self.paths[reason].append(str(path))

    def report(self) -> None:
        for reason, paths in self.paths.items():
            examples = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
            logger.warning("%s: skipped %d file(s): %s (%s)", self.dataset_name, len(paths), reason, examples)


def scan_class_tree(
    mask_dir: Path, image_dir: Path, image_ext: str, skips: SkipLog
) -> list[Sample]:
    """Pair ``mask_dir/<class>/<stem>_<r>.png`` with ``image_dir/<class>/<stem><image_ext>``.

    Classes are the sub-folders of ``mask_dir`` in sorted order; ``label`` is the class position
    (the original indexed an unsorted glob, which depends on the file system). The two folders may
    be the same. Masks without an image, images without a mask and PNGs in the mask folder without
    a ratio suffix are recorded in ``skips``. Returns the pairs sorted by class, then mask name.
    """
    samples = []
    class_dirs = sorted((d for d in os.scandir(mask_dir) if d.is_dir()), key=lambda d: d.name)
    for label, class_entry in enumerate(class_dirs):
        class_mask_dir = Path(class_entry.path)
        class_image_dir = image_dir / class_entry.name
        mask_names = sorted(os.listdir(class_mask_dir))
        image_names = set(os.listdir(class_image_dir)) if class_image_dir.is_dir() else set()
        masks = {name: parsed for name in mask_names if (parsed := split_mask_name(name)) is not None}
        paired = set()
        for name, (stem, ratio) in masks.items():
            rgb_name = stem + image_ext
            if rgb_name not in image_names:
                skips.add("mask without its image", class_mask_dir / name)
                continue
            paired.add(rgb_name)
            samples.append(Sample(class_image_dir / rgb_name, class_mask_dir / name, ratio, label))
        lone_images = {n for n in image_names if n.endswith(image_ext)} - paired - set(masks)
        for name in sorted(lone_images):
            skips.add("image without a mask", class_image_dir / name)
        same_dir = class_image_dir == class_mask_dir
        for name in mask_names:
            if name.endswith(".png") and name not in masks and not (same_dir and name in paired | lone_images):
                skips.add("PNG without a '_<ratio>.png' suffix (not a mask; run the prepare script)",
                          class_mask_dir / name)
    return samples


def select_by_ratio(samples: list[Sample], window: Window | None, name: str) -> list[Sample]:
    """The samples whose ratio is strictly inside ``window``; ValueError if none is."""
    kept = [s for s in samples if in_window(s.ratio, window)]
    if not kept:
        raise ValueError(f"none of the {len(samples)} {name} samples has a foreground ratio in {window}: "
                         "widen the threshold")
    logger.info("%s: %d of %d samples in the ratio window %s", name, len(kept), len(samples), window)
    return kept


def check_headers(samples: list[Sample], same_size: bool, skips: SkipLog) -> list[Sample]:
    """Samples whose two files open as images (header only) and, if ``same_size``, agree in size."""
    kept = []
    for sample in samples:
        try:
            rgb_size = image_size(sample.rgb_path)
        except IMAGE_ERRORS as err:
            skips.add(f"unreadable image ({type(err).__name__})", sample.rgb_path)
            continue
        try:
            mask_size = image_size(sample.mask_path)
        except IMAGE_ERRORS as err:
            skips.add(f"unreadable mask ({type(err).__name__})", sample.mask_path)
            continue
        if same_size and rgb_size != mask_size:
            skips.add("image and mask sizes differ", sample.mask_path)
            continue
        kept.append(sample)
    return kept


def require_dir(path: Path, what: str, hint: str) -> None:
    """Raise FileNotFoundError naming ``what`` and ``hint`` when ``path`` is not a folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path} does not exist: {hint}")


# ----------------------------------------------------------------------------- transforms


def randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive) from torch's global generator."""
    return int(torch.randint(low, high + 1, ()).item())


def random_flip(rgb: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Mirror both images left-right with probability 0.5."""
    if torch.rand(()).item() < 0.5:
        return TF.hflip(rgb), TF.hflip(mask)
    return rgb, mask


def crop_box(width: int, height: int, original: bool) -> tuple[int, int, int, int]:
    """Random crop box (left, upper, right, lower) covering 95-99 % of a ``width x height`` image.

    Draws ``w in [int(.95 W), int(.99 W)]``, ``h`` likewise, ``left in [0, W - w]``,
    ``upper in [0, H - h]``. The box is ``w x h`` at (left, upper). With ``original=True`` the right
    and lower edges are drawn as the original code did, ``right in [w - left, W]`` and
    ``lower in [h - upper, H]``, which jitters the aspect ratio and sometimes shrinks the crop.
    """
    w = randint(int(0.95 * width), int(0.99 * width))
    h = randint(int(0.95 * height), int(0.99 * height))
    left = randint(0, width - w)
    upper = randint(0, height - h)
    if original:
        return left, upper, randint(w - left, width), randint(h - upper, height)
    return left, upper, left + w, upper + h


def pad_to_aspect(image: Image.Image, ratio: float) -> Image.Image:
    """Pad with black, centred (left/top get the floor of half the border), to height/width = ratio."""
    w, h = image.size
    new_w = max(w, round(h / ratio))
    new_h = max(h, round(w * ratio))
    left, top = (new_w - w) // 2, (new_h - h) // 2
    return TF.pad(image, [left, top, new_w - w - left, new_h - h - top], fill=0)


def fit(rgb: Image.Image, mask: Image.Image, width: int, height: int, mode: Fit) -> tuple[Image.Image, Image.Image]:
    """Resize the pair to ``width x height``: RGB bicubic, mask nearest.

    ``mode="pad"`` first pads both to the target aspect ratio (centred, black), preserving the
    object's shape (CUB; the original's square padding when width == height). ``mode="stretch"``
    resizes directly (Market, ATR), as the original did.
    """
    if mode == "pad":
        rgb, mask = pad_to_aspect(rgb, height / width), pad_to_aspect(mask, height / width)
    rgb = TF.resize(rgb, [height, width], interpolation=InterpolationMode.BICUBIC)
    mask = TF.resize(mask, [height, width], interpolation=InterpolationMode.NEAREST)
    return rgb, mask


def flip_pad_crop(rgb: Image.Image, mask: Image.Image, original_crop: bool) -> tuple[Image.Image, Image.Image]:
    """CUB / ATR augmentation: random flip, 10 px black padding, random 95-99 % crop (`crop_box`)."""
    rgb, mask = random_flip(rgb, mask)
    rgb, mask = TF.pad(rgb, PAD_PIXELS, fill=0), TF.pad(mask, PAD_PIXELS, fill=0)
    box = crop_box(*rgb.size, original=original_crop)
    return rgb.crop(box), mask.crop(box)


def pad_shift_flip(rgb: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Market augmentation on an already fitted pair: 10 px black padding, a crop of the original size
    at a uniform offset in {0..20}^2 (a +-10 px translation), then a random flip."""
    w, h = rgb.size
    rgb, mask = TF.pad(rgb, PAD_PIXELS, fill=0), TF.pad(mask, PAD_PIXELS, fill=0)
    left, upper = randint(0, 2 * PAD_PIXELS), randint(0, 2 * PAD_PIXELS)
    box = (left, upper, left + w, upper + h)
    return random_flip(rgb.crop(box), mask.crop(box))


def to_images(rgb: Image.Image, mask: Image.Image, bg: bool) -> torch.Tensor:
    """(4, H, W) float32 in [0, 1]: RGB (value / 255) and the binary mask (grey > 160).

    ``bg=False`` whitens the background (``rgb * m + (1 - m)``); ``bg=True`` keeps it. Computed in
    numpy: single-threaded, so loading never waits on torch's intra-op thread pool.
    """
    rgb_a = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    mask_a = (np.asarray(mask) > FINAL_MASK_THRESHOLD).astype(np.float32)[None]
    if not bg:
        rgb_a = rgb_a * mask_a + (np.float32(1.0) - mask_a)
    return torch.from_numpy(np.concatenate([rgb_a, mask_a], axis=0))


# ----------------------------------------------------------------------------- dataset


class MaskedImageDataset(Dataset):
    """RGB + mask pairs -> flat item dicts, with the per-dataset augmentation and fitting.

    Args:
        samples: the listed pairs (see `scan_class_tree`); their headers are checked here.
        width, height: output size W x H in pixels.
        aug: apply the training augmentation (``aug_style``).
        bg: keep the real background (True) or whiten it (False).
        aug_style: ``"crop"`` (flip, pad, random crop, then fit; CUB/ATR) or ``"shift"`` (fit, pad,
            +-10 px shift, flip; Market).
        fit_mode: ``"pad"`` or ``"stretch"`` (see `fit`).
        mask_threshold: grey level of the first binarisation at load (160 CUB, 0 otherwise).
        original_crop: reproduce the original's random-crop edge draws (see `crop_box`).
        repeats: the dataset visits every sample this many times per pass (CUB train: 2).
        name: used in log messages.
        skips: the construction-time skip record, kept as ``self.skipped`` (reason -> paths).

    RGB and mask must have the same size unless the transform handles each on its own
    (``fit_mode="stretch"`` with ``aug_style="shift"`` or no augmentation: Market's HQ images and
    masks may differ in resolution).
    """

    def __init__(
        self,
        samples: list[Sample],
        *,
        width: int,
        height: int,
        aug: bool,
        bg: bool,
        aug_style: AugStyle,
        fit_mode: Fit,
        mask_threshold: int,
        original_crop: bool = False,
        repeats: int = 1,
        name: str,
        skips: SkipLog,
    ):
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        self.same_size = not (fit_mode == "stretch" and (aug_style == "shift" or not aug))
        samples = check_headers(samples, self.same_size, skips)
        skips.report()
        if not samples:
            raise ValueError(f"{name}: no usable samples (see the warnings above for skipped files)")
        self.samples = samples
        self.width, self.height = width, height
        self.aug, self.bg = aug, bg
        self.aug_style, self.fit_mode = aug_style, fit_mode
        self.mask_threshold = mask_threshold
        self.original_crop = original_crop
        self.repeats = repeats
        self.name = name
        self.skipped = dict(skips.paths)
        self.load_skips = 0
        logger.info("%s: %d samples (x%d per pass), %d skipped", name, len(samples), repeats,
                    sum(len(p) for p in self.skipped.values()))

    def __len__(self) -> int:
        return self.repeats * len(self.samples)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} of length {len(self)}")
        n = len(self.samples)
        for attempt in range(n):
            position = (index + attempt) % n
            try:
                return self.load(position)
            except BadSampleError as err:
                self.load_skips += 1
                logger.warning("%s: skipping %s at load time: %s (%d skipped in this process)",
                               self.name, self.samples[position].mask_path, err, self.load_skips)
        raise RunError(f"{self.name}: every sample failed to load (see the warnings above)")

    def load(self, position: int) -> dict:
        """Item of sample ``position`` (no index wrapping); raises BadSampleError for a bad sample."""
        sample = self.samples[position]
        try:
            rgb = load_rgb(sample.rgb_path)
            mask = load_mask(sample.mask_path, self.mask_threshold)
        except IMAGE_ERRORS as err:
            raise BadSampleError(f"cannot decode: {err}") from err
        if mask.getbbox() is None:
            raise BadSampleError("mask has no foreground pixel")
        if self.same_size and rgb.size != mask.size:
            raise BadSampleError(f"image size {rgb.size} differs from mask size {mask.size}")
        images = to_images(*self.transform(rgb, mask), bg=self.bg)
        if images[3].max() == 0:
            raise BadSampleError("mask has no foreground pixel after resizing")
        return {"images": images, "path": str(sample.rgb_path), "label": sample.label}

    def transform(self, rgb: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
        """Augment (if enabled) and fit the pair to the output size."""
        if self.aug and self.aug_style == "crop":
            rgb, mask = flip_pad_crop(rgb, mask, self.original_crop)
        rgb, mask = fit(rgb, mask, self.width, self.height, self.fit_mode)
        if self.aug and self.aug_style == "shift":
            rgb, mask = pad_shift_flip(rgb, mask)
        return rgb, mask


def output_size(image_size: int, ratio: float) -> tuple[int, int]:
    """(width, height) = (image_size, round(ratio * image_size)); raises ValueError if not positive."""
    if image_size < 1 or ratio <= 0 or not math.isfinite(ratio):
        raise ValueError(f"image_size must be >= 1 and ratio > 0, got {image_size} and {ratio}")
    return image_size, round(ratio * image_size)
