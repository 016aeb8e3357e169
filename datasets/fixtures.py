"""Small dataset trees in the real on-disk layouts, for the tests and the loader benchmark.

Every mask holds a block of exactly ``round(r * W * H)`` foreground pixels, so the ratio in its
name is the ratio of its content. Images are a flat background colour `BACKGROUND` with an object
of colour `FOREGROUND` on the mask pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.atr import IMAGE_FOLDER, PARSING_FOLDER, split_list_path
from datasets.atr import MASK_FOLDER as ATR_MASK_FOLDER
from datasets.common import mask_file_name
from datasets.market import IMAGE_FOLDER as MARKET_IMAGE_FOLDER
from datasets.market import MASK_FOLDER as MARKET_MASK_FOLDER
from datasets.market import SPLIT_FOLDERS

BACKGROUND = (0, 64, 128)
FOREGROUND = (250, 200, 20)
SOFT_VALUE = 100
"""Grey value of the soft border pixels of CUB-style masks: foreground for the ratio (> 0), background
for the CUB loader (<= 160)."""


def block_mask(width: int, height: int, ratio: float, value: int = 255, soft_border: int = 0) -> np.ndarray:
    """(H, W) uint8 mask with exactly ``round(ratio * W * H)`` non-zero pixels in a centred block.

    The block is filled row by row; its last ``soft_border`` pixels get `SOFT_VALUE` instead of
    ``value``.
    """
    count = round(ratio * width * height)
    mask = np.zeros(height * width, np.uint8)
    if count:
        block_w = min(width, max(1, math.ceil(math.sqrt(count * width / height))))
        rows = math.ceil(count / block_w)
        top, left = (height - rows) // 2, (width - block_w) // 2
        ys, xs = np.divmod(np.arange(count), block_w)
        flat = (top + ys) * width + left + xs
        mask[flat] = value
        if soft_border:
            mask[flat[-soft_border:]] = SOFT_VALUE
    return mask.reshape(height, width)


def object_image(mask: np.ndarray) -> Image.Image:
    """RGB image: `BACKGROUND` everywhere, `FOREGROUND` where ``mask`` is non-zero."""
    rgb = np.empty((*mask.shape, 3), np.uint8)
    rgb[:] = BACKGROUND
    rgb[mask > 0] = FOREGROUND
    return Image.fromarray(rgb)


def write_class_tree(
    split_dir: Path,
    ratios: Sequence[float],
    size: tuple[int, int],
    image_ext: str,
    classes: Sequence[str] = ("001.Alpha", "002.Beta"),
    prefix: str = "item",
    soft_border: int = 0,
    image_dir: Path | None = None,
    mask_size: tuple[int, int] | None = None,
) -> list[Path]:
    """Write one sample per ratio, round-robin over ``classes``; returns the mask paths.

    ``split_dir/<class>/<prefix>_<i><suffix>_<r>.png`` masks and ``image_dir/<class>/<prefix>_<i><suffix>
    <image_ext>`` images (``image_dir`` defaults to ``split_dir``), where ``<suffix>`` is ``.jpg`` for
    ``.png`` images in a separate folder (Market's ``<orig>.jpg.png`` naming), else empty.
    """
    image_dir = split_dir if image_dir is None else image_dir
    suffix = ".jpg" if image_dir != split_dir else ""
    width, height = size
    mask_w, mask_h = mask_size or size
    paths = []
    for i, ratio in enumerate(ratios):
        class_name = classes[i % len(classes)]
        stem = f"{prefix}_{i:04d}{suffix}"
        (split_dir / class_name).mkdir(parents=True, exist_ok=True)
        (image_dir / class_name).mkdir(parents=True, exist_ok=True)
        image_mask = block_mask(width, height, ratio)
        save_image(object_image(image_mask), image_dir / class_name / f"{stem}{image_ext}")
        mask = block_mask(mask_w, mask_h, ratio, soft_border=soft_border)
        path = split_dir / class_name / mask_file_name(stem, ratio)
        Image.fromarray(mask).save(path)
        paths.append(path)
    return paths


def save_image(image: Image.Image, path: Path) -> None:
    """Save as the extension says; JPEG at quality 100 like the prepare scripts."""
    if path.suffix == ".jpg":
        image.save(path, quality=100)
    else:
        image.save(path)


def write_cub_tree(root: Path, ratios: dict[str, Sequence[float]], size: tuple[int, int] = (40, 30),
                   soft_border: int = 0) -> None:
    """Prepared CUB layout: ``root/<split>/<class>/<name>.jpg`` + ``<name>_<r>.png`` per ratio."""
    for split, split_ratios in ratios.items():
        write_class_tree(root / split, split_ratios, size, ".jpg", prefix=f"Bird_{split}",
                         soft_border=soft_border)


def write_market_tree(root: Path, ratios: dict[str, Sequence[float]], size: tuple[int, int] = (20, 40),
                      mask_size: tuple[int, int] | None = None) -> None:
    """Market layout: ``root/pytorch/<folder>/<pid>/<orig>.jpg.png`` + ``root/seg_hmr/.../<orig>.jpg_<r>.png``."""
    for split, split_ratios in ratios.items():
        folder = SPLIT_FOLDERS[split]
        write_class_tree(root / MARKET_MASK_FOLDER / folder, split_ratios, size, ".png",
                         classes=("0002", "0007"), prefix=f"0002_c1s1_{split}",
                         image_dir=root / MARKET_IMAGE_FOLDER / folder, mask_size=mask_size)


def write_atr_tree(root: Path, ratios: dict[str, Sequence[float]], size: tuple[int, int] = (30, 50)) -> None:
    """Prepared ATR layout: ``JPEGImages/<stem>.jpg``, ``Seg/<stem>_<r>.png`` and the split lists."""
    (root / IMAGE_FOLDER).mkdir(parents=True, exist_ok=True)
    (root / ATR_MASK_FOLDER).mkdir(parents=True, exist_ok=True)
    width, height = size
    for split, split_ratios in ratios.items():
        stems = [f"{'2500' if split == 'train' else 'fash'}_{i + 1}" for i in range(len(split_ratios))]
        for stem, ratio in zip(stems, split_ratios, strict=True):
            mask = block_mask(width, height, ratio)
            save_image(object_image(mask), root / IMAGE_FOLDER / f"{stem}.jpg")
            Image.fromarray(mask).save(root / ATR_MASK_FOLDER / mask_file_name(stem, ratio))
        split_list_path(root, split).write_text("".join(f"{s}\n" for s in stems))


def write_atr_raw(root: Path, stems: Sequence[str], size: tuple[int, int] = (30, 50)) -> None:
    """Downloaded ATR layout: ``JPEGImages/<stem>.jpg`` and ``SegmentationClassAug/<stem>.png`` label
    maps (labels 0..17, 0 = background) with a one-pixel hole inside the person block."""
    (root / IMAGE_FOLDER).mkdir(parents=True, exist_ok=True)
    (root / PARSING_FOLDER).mkdir(parents=True, exist_ok=True)
    width, height = size
    for i, stem in enumerate(stems):
        mask = block_mask(width, height, 0.3)
        labels = np.where(mask > 0, 1 + (np.arange(mask.size).reshape(mask.shape) + i) % 17, 0).astype(np.uint8)
        ys, xs = np.nonzero(labels)
        labels[(ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2] = 0
        save_image(object_image(mask), root / IMAGE_FOLDER / f"{stem}.jpg")
        Image.fromarray(labels).save(root / PARSING_FOLDER / f"{stem}.png")


def write_cub_raw(raw: Path, boxes: Sequence[tuple[float, float, float, float]], size: tuple[int, int] = (60, 40),
                  train: Sequence[bool] | None = None) -> list[str]:
    """Unpacked CUB_200_2011 layout: ``images/``, ``segmentations/`` (soft masks: 255 inside the box,
    `SOFT_VALUE` on its first row), ``images.txt``, ``train_test_split.txt``, ``bounding_boxes.txt``.

    One image per box (x, y, w, h), alternating train / test unless ``train`` says otherwise, in two
    classes. Returns the image paths relative to ``images/``.
    """
    width, height = size
    rel_paths = []
    lines = {"images.txt": [], "train_test_split.txt": [], "bounding_boxes.txt": []}
    for i, box in enumerate(boxes):
        image_id = i + 1
        class_name = ("001.Alpha", "002.Beta")[i % 2]
        rel = f"{class_name}/Bird_{image_id:04d}.jpg"
        mask = np.zeros((height, width), np.uint8)
        x, y, w, h = (int(v) for v in box)
        mask[y:y + h, x:x + w] = 255
        mask[y, x:x + w] = SOFT_VALUE
        pairs = (("images", object_image(mask), ".jpg"), ("segmentations", Image.fromarray(mask), ".png"))
        for folder, image, ext in pairs:
            (raw / folder / class_name).mkdir(parents=True, exist_ok=True)
            save_image(image, raw / folder / rel.replace(".jpg", ext))
        is_train = train[i] if train is not None else i % 2 == 0
        lines["images.txt"].append(f"{image_id} {rel}")
        lines["train_test_split.txt"].append(f"{image_id} {int(is_train)}")
        lines["bounding_boxes.txt"].append(f"{image_id} {' '.join(f'{v:.1f}' for v in box)}")
        rel_paths.append(rel)
    for name, content in lines.items():
        (raw / name).write_text("\n".join(content) + "\n")
    return rel_paths
