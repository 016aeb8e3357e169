"""Market-HQ person images with the ``seg_hmr`` masks (data-eval-vis.md §2.3).

Layout (the loader's root is the folder holding both trees, default ``data/Market``; the original
pointed its root at ``seg_hmr`` and derived the image folder by string replacement)::

    <root>/pytorch/<split>/<pid>/<orig>.jpg.png          RGB image (PNG)
    <root>/seg_hmr/<split>/<pid>/<orig>.jpg_<r>.png      mask with its foreground ratio

Splits: ``train`` reads ``train_all`` (12,936 images), ``test`` reads ``query`` (3,368 images).

Behaviour, as the original ``MarketDataset``: masks binarised at grey > 0; the threshold window
filters the train split only; training augmentation resizes to W x H, pads 10 px black, crops
W x H at a uniform offset in {0..20}^2 and flips with p = 0.5; images are always resized to W x H
without keeping their aspect ratio (Market crops are close to 1:2 already). ``len = N``.

Not carried over: the ``rgb`` item key (a copy of the first three channels), and the ``hmr``/``obj``
SMPL-vertex option (off in every README run); labels index the sorted identity folders.
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

SPLIT_FOLDERS = {"train": "train_all", "test": "query"}
IMAGE_FOLDER = "pytorch"
MASK_FOLDER = "seg_hmr"
HINT = ("download and prepare it with `python prepare_market.py --download` or pass the folder that "
        f"holds {IMAGE_FOLDER}/ and {MASK_FOLDER}/ (the parent of {MASK_FOLDER}/, not {MASK_FOLDER}/ itself)")


class MarketDataset(MaskedImageDataset):
    """Market-HQ: ``<root>/pytorch/<folder>/<pid>/<stem>.png`` + ``<root>/seg_hmr/<folder>/<pid>/<stem>_<r>.png``.

    Args:
        root: folder holding ``pytorch/`` and ``seg_hmr/``.
        split: ``"train"`` (``train_all``) or ``"test"`` (``query``).
        image_size: output width W; height H = round(ratio * W) (Market: 64 x 128).
        ratio: H / W (Market: 2).
        threshold: foreground-ratio window, train split only; None keeps everything.
        aug: training augmentation (pad, shift, flip).
        bg: keep the real background (True) or whiten it (False).
        train_repeats: visits of each train image per ``len``.
    Items: ``{"images": (4, H, W) float32 in [0, 1], "path": str, "label": int}`` (label = identity
    folder position in sorted order).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int = 64,
        ratio: float = 2.0,
        threshold: str | tuple[float, float] | None = None,
        aug: bool = False,
        bg: bool = False,
        train_repeats: int = 1,
    ):
        if split not in SPLIT_FOLDERS:
            raise ValueError(f"Market split must be one of {tuple(SPLIT_FOLDERS)}, got {split!r}")
        root = Path(root)
        require_dir(root, "Market root", HINT)
        folder = SPLIT_FOLDERS[split]
        mask_dir, image_dir = root / MASK_FOLDER / folder, root / IMAGE_FOLDER / folder
        require_dir(mask_dir, f"Market {split} mask folder", HINT)
        require_dir(image_dir, f"Market {split} image folder", HINT)
        skips = SkipLog(f"Market {split}")
        samples = scan_class_tree(mask_dir, image_dir, ".png", skips)
        if not samples:
            skips.report()
            raise ValueError(f"Market {split}: no '<stem>_<ratio>.png' mask in {mask_dir} has its image "
                             f"in {image_dir}: {HINT}")
        window = parse_threshold(threshold) if split == "train" else None
        kept = select_by_ratio(samples, window, f"Market {split}")
        width, height = output_size(image_size, ratio)
        super().__init__(
            kept,
            width=width,
            height=height,
            aug=aug,
            bg=bg,
            aug_style="shift",
            fit_mode="stretch",
            mask_threshold=0,
            repeats=train_repeats if split == "train" else 1,
            name=f"Market {split}",
            skips=skips,
        )
