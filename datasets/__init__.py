"""Datasets: CUB birds, Market-HQ persons, ATR persons, the synthetic shapes and the generated birds.

`build_dataset` is the one entry the scripts use. Every dataset returns flat item dicts
``{"images": (4, H, W) float32 in [0, 1] (RGB + binary mask), "path": str, "label": int}`` (the
synthetic and bird ones add their ground truth, see `datasets.synthetic` and `datasets.birds`), with W = image_size and
H = round(ratio * W). Loading, validation and skip rules are described in `datasets.common`.

Default roots (folders under ``data/``): ``cub`` -> ``data/CUB_Data``, ``market`` -> ``data/Market``,
``atr`` -> ``data/ATR``, ``synthetic`` -> ``data/synthetic``, ``birds`` -> ``data/birds``.
"""

from __future__ import annotations

from pathlib import Path

from datasets.atr import ATRDataset
from datasets.birds import BirdsDataset
from datasets.common import MaskedImageDataset
from datasets.cub import CUBDataset
from datasets.market import MarketDataset
from datasets.synthetic import SyntheticDataset

DEFAULT_ROOTS = {
    "cub": Path("data/CUB_Data"),
    "market": Path("data/Market"),
    "atr": Path("data/ATR"),
    "synthetic": Path("data/synthetic"),
    "birds": Path("data/birds"),
}
"""Where the prepare scripts (and `ensure_synthetic` / `ensure_birds`) put each dataset."""

CROP_DATASETS = ("cub", "atr", "synthetic", "birds")
"""Datasets augmented by flip + pad + random crop (`datasets.common.flip_pad_crop`); Market shifts instead."""


def build_dataset(
    name: str,
    root: str | Path,
    split: str,
    image_size: int,
    ratio: float,
    threshold: str | tuple[float, float] | None,
    aug: bool,
    bg: bool,
    *,
    original_crop: bool = False,
    filter_test: bool = False,
    train_repeats: int | None = None,
) -> MaskedImageDataset:
    """The dataset ``name`` (``cub``, ``market``, ``atr``, ``synthetic``, ``birds``) for one split.

    Args:
        name: dataset name.
        root: dataset folder (see `DEFAULT_ROOTS` and each module's layout).
        split: ``"train"`` or ``"test"``.
        image_size: output width W in pixels; height H = round(ratio * W).
        ratio: H / W (CUB 1, Market 2, ATR 1.666666).
        threshold: foreground-ratio window ``"lo,hi"`` / (lo, hi) (strict), applied to the train
            split (and to the ATR test split with ``filter_test``); None keeps everything.
        aug: training augmentation.
        bg: keep the real background in the RGB channels (True) or whiten it (False).
        original_crop: CUB / ATR / synthetic / birds: reproduce the original's random-crop edge draws.
        filter_test: ATR: filter the test split by ``threshold`` too, as the original ATR2 did.
        train_repeats: visits of each train image per pass; None: the dataset's own (CUB and birds 2,
            the others 1).
    Raises:
        ValueError for an unknown name or split, an empty split or a bad threshold;
        FileNotFoundError for a missing folder or ATR split list.
    """
    if original_crop and name not in CROP_DATASETS:
        raise ValueError(f"original_crop only applies to the {', '.join(CROP_DATASETS)} datasets, not {name!r}")
    if filter_test and name != "atr":
        raise ValueError(f"filter_test only applies to the atr dataset, not {name!r}")
    common = dict(image_size=image_size, ratio=ratio, threshold=threshold, aug=aug, bg=bg)
    if train_repeats is not None:
        common["train_repeats"] = train_repeats
    if name == "cub":
        return CUBDataset(root, split, original_crop=original_crop, **common)
    if name == "market":
        return MarketDataset(root, split, **common)
    if name == "atr":
        return ATRDataset(root, split, original_crop=original_crop, filter_test=filter_test, **common)
    if name == "synthetic":
        return SyntheticDataset(root, split, original_crop=original_crop, **common)
    if name == "birds":
        return BirdsDataset(root, split, original_crop=original_crop, **common)
    raise ValueError(f"unknown dataset {name!r}: choose one of {tuple(DEFAULT_ROOTS)}")
