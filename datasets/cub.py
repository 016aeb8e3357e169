"""CUB-200-2011 birds (data-eval-vis.md §2.2), prepared by ``prepare_cub.py``.

Layout (the loader's root is the folder holding ``train/`` and ``test/``, default ``data/CUB_Data``)::

    <root>/{train,test}/<class_dir>/<name>.jpg          bounding-box crop (10 % margin), JPEG q100
    <root>/{train,test}/<class_dir>/<name>_<r>.png      its soft segmentation, r = foreground ratio

Behaviour, as the original ``CUBDataset``:

* masks are binarised at grey > 160 (the masks are annotator-vote averages);
* the train split keeps ``lo < r < hi`` of the threshold window; the test split is never filtered;
* training augmentation (``aug``): flip, 10 px black pad, random 95-99 % crop (`common.crop_box`);
* always: black, centred padding to the output aspect ratio (square for CUB), then resize to
  W x H (bicubic RGB, nearest mask);
* the train split is visited twice per pass (``len = 2 N``), which sets the epoch length the
  original's schedules were tuned for.

Differences from the original, on purpose: the crop is a fixed-size random crop unless
``original_crop=True`` (the original drew the right/lower edges independently); the test split is
not doubled (its duplicates only re-wrote the same evaluation files); file lists and labels are
sorted, so they do not depend on the file system.

The synthetic dataset uses this class with lossless PNG images (`datasets.synthetic`).
"""

from __future__ import annotations

from pathlib import Path

from datasets.common import (
    MaskedImageDataset,
    SkipLog,
    output_size,
    parse_threshold,
    require_dir,
    scan_class_tree,
    select_by_ratio,
)

SPLITS = ("train", "test")
TRAIN_REPEATS = 2
"""Passes over the CUB train split per epoch (the original's ``__len__`` doubling)."""


class CUBDataset(MaskedImageDataset):
    """CUB-layout dataset: ``<root>/<split>/<class>/<stem><image_ext>`` + ``<stem>_<r>.png`` masks.

    Args:
        root: folder holding ``train/`` and ``test/``.
        split: ``"train"`` or ``"test"``.
        image_size: output width W in pixels; height H = round(ratio * W).
        ratio: H / W (CUB: 1).
        threshold: foreground-ratio window ``"lo,hi"`` or (lo, hi), applied to the train split only;
            None keeps everything.
        aug: training augmentation (flip, pad, crop).
        bg: keep the real background (True) or whiten it (False).
        original_crop: reproduce the original's random-crop edge draws (`common.crop_box`).
        image_ext: extension of the RGB files (``.jpg`` for CUB).
        mask_threshold: grey level of the mask binarisation (160 for CUB's soft masks).
        train_repeats: passes over the train split per ``len``.
        name: dataset name in messages.
    Items: ``{"images": (4, H, W) float32 in [0, 1], "path": str, "label": int}`` where label is the
    position of the class folder in sorted order.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int = 128,
        ratio: float = 1.0,
        threshold: str | tuple[float, float] | None = None,
        aug: bool = False,
        bg: bool = False,
        original_crop: bool = False,
        image_ext: str = ".jpg",
        mask_threshold: int = 160,
        train_repeats: int = TRAIN_REPEATS,
        name: str = "CUB",
        hint: str = "download and prepare it with `python prepare_cub.py --download` or pass the "
        "folder that holds train/ and test/",
    ):
        if split not in SPLITS:
            raise ValueError(f"{name} split must be one of {SPLITS}, got {split!r}")
        root = Path(root)
        require_dir(root, f"{name} root", hint)
        split_dir = root / split
        require_dir(split_dir, f"{name} {split} split", hint)
        skips = SkipLog(f"{name} {split}")
        samples = scan_class_tree(split_dir, split_dir, image_ext, skips)
        if not samples:
            skips.report()
            raise ValueError(
                f"{name} {split} split {split_dir} has no '<stem>_<ratio>.png' mask paired with a "
                f"'<stem>{image_ext}' image: {hint}"
            )
        window = parse_threshold(threshold) if split == "train" else None
        kept = select_by_ratio(samples, window, f"{name} {split}")
        width, height = output_size(image_size, ratio)
        super().__init__(
            kept,
            width=width,
            height=height,
            aug=aug,
            bg=bg,
            aug_style="crop",
            fit_mode="pad",
            mask_threshold=mask_threshold,
            original_crop=original_crop,
            repeats=train_repeats if split == "train" else 1,
            name=f"{name} {split}",
            skips=skips,
        )
