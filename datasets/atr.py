"""ATR human parsing (data-eval-vis.md §2.4), prepared by ``prepare_ATR.py``.

Layout (the loader's root, default ``data/ATR``, is the original's ``humanparsing`` folder)::

    <root>/JPEGImages/<stem>.jpg
    <root>/SegmentationClassAug/<stem>.png      parsing label map, 0 = background (input of prepare)
    <root>/Seg/<stem>_<r>.png                   binary, hole-filled person mask (written by prepare)
    <root>/ATR_train.txt, <root>/ATR_test.txt   the split: one stem per line

Stems are ``<prefix>_<n>`` with the prefixes of `SPLIT_COUNTS`. A split-list line may also be a
mask file name (``2500_1349_0.25.png``, the original's list format): its ratio suffix is ignored and
the mask is looked up in ``Seg/`` by stem, so the original lists can be dropped in unchanged.

The split. The original's list files are not available offline, so `split_stems` makes our own,
deterministically, from the spec's per-prefix counts (16,000 train / 1,706 test, same counts per
prefix; `SPLIT_COUNTS`): within each prefix, stems are sorted by number and the test stems are
evenly spaced through that order. ``prepare_ATR.py`` writes the two list files into the data root
(it keeps lists already there, e.g. the original ones). Test-split membership, hence ATR test
numbers, can only match the paper's with the original lists.

Behaviour, as the original ``ATR2Dataset`` (the README's ATR model, 96 x 160): masks binarised at
grey > 0; training augmentation as CUB (flip, 10 px pad, random 95-99 % crop); images resized to
W x H without keeping the aspect ratio (``fit_mode="stretch"``; ``"pad"`` with ratio 1 gives the
square ``ATRDataset`` variant); label -1; ``len = N``.

Original-behaviour flags: ``original_crop`` (crop edge draws, as CUB) and ``filter_test``: ATR2
applied the threshold window to the test split too (1,647 of 1,706 images with "0.09,0.49"); by
default the test split is complete, like CUB's and Market's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from datasets.common import (
    Fit,
    MaskedImageDataset,
    Sample,
    SkipLog,
    output_size,
    parse_threshold,
    require_dir,
    select_by_ratio,
    split_mask_name,
)

SPLITS = ("train", "test")
IMAGE_FOLDER = "JPEGImages"
PARSING_FOLDER = "SegmentationClassAug"
MASK_FOLDER = "Seg"
HINT = ("download and prepare it with `python prepare_ATR.py --download` or pass the folder that holds "
        f"{IMAGE_FOLDER}/, {MASK_FOLDER}/ and the ATR_train.txt / ATR_test.txt lists")

SPLIT_COUNTS: dict[str, tuple[int, int]] = {
    "dataset10k": (9020, 983),
    "4565": (2978, 324),
    "2500": (2248, 228),
    "997": (730, 75),
    "fash": (635, 50),
    "Multi": (389, 46),
}
"""(train, test) images per stem prefix in the original split (16,000 / 1,706)."""

_STEM = re.compile(r"^(?P<prefix>.+)_(?P<number>\d+)$")


def split_list_path(root: str | Path, split: str) -> Path:
    """``<root>/ATR_<split>.txt``."""
    return Path(root) / f"ATR_{split}.txt"


def list_stem(line: str) -> str:
    """Stem of a split-list line: the line itself, or a mask file name without its ratio suffix."""
    parsed = split_mask_name(line)
    return parsed[0] if parsed else line


def read_split_list(path: Path) -> list[str]:
    """Stems listed in a split file (blank lines ignored)."""
    return [list_stem(line.strip()) for line in path.read_text().splitlines() if line.strip()]


def _stem_key(stem: str) -> tuple[str, int, str]:
    match = _STEM.match(stem)
    if match is None:
        return stem, -1, stem
    return match["prefix"], int(match["number"]), stem


def split_stems(stems: Iterable[str]) -> tuple[list[str], list[str]]:
    """Deterministic (train, test) split of ATR stems with the original per-prefix proportions.

    For a prefix of `SPLIT_COUNTS` with exactly the original number of images, the test part has the
    original count; otherwise (a partial download, an unknown prefix) it has the same fraction,
    rounded. Test stems are the ``k`` evenly spaced positions ``floor((i + 1/2) n / k)`` of the
    prefix's stems sorted by number. Returns both lists sorted by (prefix, number).
    """
    groups: dict[str, list[str]] = {}
    for stem in sorted(set(stems), key=_stem_key):
        groups.setdefault(_stem_key(stem)[0], []).append(stem)
    total_train = sum(c[0] for c in SPLIT_COUNTS.values())
    total_test = sum(c[1] for c in SPLIT_COUNTS.values())
    train, test = [], []
    for prefix, members in groups.items():
        n = len(members)
        n_train, n_test = SPLIT_COUNTS.get(prefix, (total_train, total_test))
        k = n_test if n == n_train + n_test else round(n * n_test / (n_train + n_test))
        test_positions = {int((i + 0.5) * n / k) for i in range(k)}
        for position, stem in enumerate(members):
            (test if position in test_positions else train).append(stem)
    return train, test


def scan_masks(mask_dir: Path) -> dict[str, tuple[str, float]]:
    """Stem -> (mask file name, ratio) for every ``<stem>_<r>.png`` in ``mask_dir``."""
    masks = {}
    for name in os.listdir(mask_dir):
        parsed = split_mask_name(name)
        if parsed is not None:
            masks[parsed[0]] = (name, parsed[1])
    return masks


class ATRDataset(MaskedImageDataset):
    """ATR: the stems of ``<root>/ATR_<split>.txt`` -> ``JPEGImages/<stem>.jpg`` + ``Seg/<stem>_<r>.png``.

    Args:
        root: folder holding ``JPEGImages/``, ``Seg/`` and the split lists.
        split: ``"train"`` or ``"test"``.
        image_size: output width W; height H = round(ratio * W) (ATR: 96 x 160, ratio 1.666666).
        ratio: H / W.
        threshold: foreground-ratio window; applied to the train split, and to the test split only
            with ``filter_test``. None keeps everything.
        aug: training augmentation (flip, pad, crop).
        bg: keep the real background (True) or whiten it (False).
        original_crop: reproduce the original's random-crop edge draws.
        filter_test: apply the threshold to the test split too (the original ATR2 behaviour).
        fit_mode: ``"stretch"`` (ATR2) or ``"pad"`` (keeps the aspect ratio).
        train_repeats: visits of each train image per ``len``.
    Items: ``{"images": (4, H, W) float32 in [0, 1], "path": str, "label": -1}``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int = 96,
        ratio: float = 1.666666,
        threshold: str | tuple[float, float] | None = None,
        aug: bool = False,
        bg: bool = False,
        original_crop: bool = False,
        filter_test: bool = False,
        fit_mode: Fit = "stretch",
        train_repeats: int = 1,
    ):
        if split not in SPLITS:
            raise ValueError(f"ATR split must be one of {SPLITS}, got {split!r}")
        root = Path(root)
        require_dir(root, "ATR root", HINT)
        image_dir, mask_dir = root / IMAGE_FOLDER, root / MASK_FOLDER
        require_dir(image_dir, "ATR image folder", HINT)
        require_dir(mask_dir, "ATR mask folder", "run `python prepare_ATR.py` to write the hole-filled masks")
        list_path = split_list_path(root, split)
        if not list_path.is_file():
            raise FileNotFoundError(f"ATR split list {list_path} does not exist: run `python prepare_ATR.py` "
                                    "to write it (or copy the original list there)")
        stems = read_split_list(list_path)
        if not stems:
            raise ValueError(f"ATR split list {list_path} is empty: delete it and run `python prepare_ATR.py`")
        masks = scan_masks(mask_dir)
        images = set(os.listdir(image_dir))
        skips = SkipLog(f"ATR {split}")
        samples = []
        for stem in stems:
            if stem not in masks:
                skips.add("listed image without a mask in Seg/", mask_dir / f"{stem}_*.png")
            elif f"{stem}.jpg" not in images:
                skips.add("listed mask without its image", mask_dir / masks[stem][0])
            else:
                mask_name, mask_ratio = masks[stem]
                samples.append(Sample(image_dir / f"{stem}.jpg", mask_dir / mask_name, mask_ratio, -1))
        if not samples:
            skips.report()
            raise ValueError(f"ATR {split}: none of the {len(stems)} stems of {list_path} has both "
                             f"{IMAGE_FOLDER}/<stem>.jpg and {MASK_FOLDER}/<stem>_<ratio>.png: {HINT}")
        window = parse_threshold(threshold) if split == "train" or filter_test else None
        kept = select_by_ratio(samples, window, f"ATR {split}")
        width, height = output_size(image_size, ratio)
        super().__init__(
            kept,
            width=width,
            height=height,
            aug=aug,
            bg=bg,
            aug_style="crop",
            fit_mode=fit_mode,
            mask_threshold=0,
            original_crop=original_crop,
            repeats=train_repeats if split == "train" else 1,
            name=f"ATR {split}",
            skips=skips,
        )
