"""What ``prepare_cub.py``, ``prepare_market.py`` and ``prepare_ATR.py`` do (the scripts only parse flags).

Per dataset: `prepare_cub` / `check_cub`, `name_market_masks` / `check_market`, `write_atr_masks` +
`write_atr_lists` / `check_atr`. Every preparation step is idempotent (work already done is
detected and skipped) and every check is read-only. Shared steps:

* `download_from_drive`: the only network step, a thin wrapper around gdown. The Google Drive ids
  of the original README are not recorded in this project's specification and cannot be looked up
  offline, so each script keeps them in a named constant that is None until filled in; the scripts
  also take ``--drive_id NAME=ID``. Without an id, the download fails with a message saying where
  to get the archive by hand.
* `fetch_archives`, `unpack_all` / `unpack`: download what is missing, extract each archive once
  (a marker file records completion), safely (tar "data" filter).
* `find_folder`, `move_into`: put the unpacked folders where the loaders expect them.
* `CheckReport` / `check_pairs`: the ``--check`` validation (read-only).
* `prepare_parser`, `run_check`, `fetch_and_unpack`: the command-line skeleton the three scripts
  share (flags, the ``--check`` branch, download + unpack).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tarfile
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datasets import atr, market
from datasets.common import (
    IMAGE_ERRORS,
    Sample,
    SkipLog,
    foreground_ratio,
    mask_file_name,
    scan_class_tree,
    split_mask_name,
)
from utils.cli import ArgumentParser, RunError

RATIO_TOLERANCE = 0.005 + 1e-9
"""A mask name's two-decimal ratio may differ from the content's ratio by its rounding, no more."""


def parse_drive_ids(pairs: Iterable[str], known: dict[str, str | None]) -> dict[str, str | None]:
    """``known`` updated with ``NAME=ID`` pairs from the command line; ValueError on unknown names."""
    ids = dict(known)
    for pair in pairs:
        name, sep, file_id = pair.partition("=")
        if not sep or name not in ids or not file_id:
            raise ValueError(f"--drive_id expects NAME=ID with NAME one of {sorted(ids)}, got {pair!r}")
        ids[name] = file_id
    return ids


def download_from_drive(file_id: str | None, path: Path, what: str, manual: str) -> Path:
    """Download one Google Drive file to ``path`` with gdown (the only network step); returns ``path``.

    Raises RuntimeError naming ``manual`` (where to get ``what`` by hand) when ``file_id`` is None or
    the download fails.
    """
    if file_id is None:
        raise RunError(
            f"No Google Drive id is known for {what}. Download it by hand ({manual}), save it as {path} "
            "and run the script again without --download, or pass --drive_id NAME=ID."
        )
    import gdown  # only needed (and only able to work) with network access

    path.parent.mkdir(parents=True, exist_ok=True)
    if gdown.download(id=file_id, output=str(path), quiet=False) is None:
        raise RunError(f"downloading {what} (Google Drive id {file_id}) failed; get it by hand: {manual}")
    return path


def archives_in(folder: Path) -> list[Path]:
    """Zip or tar files directly inside ``folder`` (sorted; recognised by content, not by name)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and (zipfile.is_zipfile(p) or tarfile.is_tarfile(p)))


def unpack(archive: Path, destination: Path) -> bool:
    """Extract a zip or tar ``archive`` into ``destination`` unless done before; True if it extracted now.

    A marker ``.<archive name>.unpacked`` in ``destination`` is written after a complete extraction,
    so an interrupted one is redone. Tar members are extracted with the "data" filter (no absolute
    paths, no links out of ``destination``).
    """
    marker = destination / f".{archive.name}.unpacked"
    if marker.exists():
        return False
    destination.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(destination)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(destination, filter="data")
    marker.touch()
    return True


def fetch_archives(drive_ids: dict[str, str | None], folder: Path, manual: str) -> None:
    """Download every archive of ``drive_ids`` (file name -> id) missing from ``folder``."""
    for name, file_id in drive_ids.items():
        if not (folder / name).exists():
            download_from_drive(file_id, folder / name, name, manual)


def unpack_all(folder: Path) -> list[Path]:
    """Unpack every archive in ``folder`` into ``folder/<archive name>.d/``; returns those unpacked now."""
    return [a for a in archives_in(folder) if unpack(a, folder / f"{a.name}.d")]


def fetch_and_unpack(args: argparse.Namespace, drive_ids: dict[str, str | None], folder: Path, manual: str,
                     in_place: bool = False) -> None:
    """With ``args.download``, fetch the archives missing from ``folder``; then unpack; print each unpacked now.

    ``drive_ids`` (archive name -> id) is updated with the ``--drive_id`` pairs of ``args``. With
    ``in_place`` only the ``drive_ids`` archives present are unpacked, straight into ``folder`` (CUB's
    archives hold their own top folder); otherwise every archive in ``folder`` goes to its own
    ``<name>.d/`` (`unpack_all`). Raises RuntimeError (download) and ValueError (bad ``--drive_id``).
    """
    if args.download:
        fetch_archives(parse_drive_ids(args.drive_id, drive_ids), folder, manual)
    if in_place:
        unpacked = [folder / name for name in drive_ids
                    if (folder / name).is_file() and unpack(folder / name, folder)]
    else:
        unpacked = unpack_all(folder)
    for archive in unpacked:
        print(f"unpacked {archive}")


def find_folder(search_root: Path, name: str, containing: Iterable[str] = ()) -> Path | None:
    """The shallowest folder called ``name`` under ``search_root`` holding every entry in ``containing``."""
    candidates = sorted(search_root.rglob(name), key=lambda p: (len(p.parts), str(p)))
    for path in candidates:
        if path.is_dir() and all((path / c).exists() for c in containing):
            return path
    return None


def move_into(source: Path | None, target: Path) -> bool:
    """Move folder ``source`` (if there is one) to ``target`` unless ``target`` exists; True if it moved."""
    if source is None or not source.is_dir() or target.exists() or source == target:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), str(target))
    return True


class CheckReport:
    """Problems found by ``--check``, by kind, with the paths concerned."""

    def __init__(self):
        self.problems: dict[str, list[str]] = defaultdict(list)
        self.counts: dict[str, int] = {}

    def add(self, kind: str, path: Path | str) -> None:
        self.problems[kind].append(str(path))

    @property
    def ok(self) -> bool:
        return not self.problems

    def print(self, title: str, examples: int = 5) -> None:
        """Counts, then every kind of problem with its number and up to ``examples`` paths."""
        print(f"{title}:")
        for name, value in self.counts.items():
            print(f"  {name}: {value}")
        if self.ok:
            print("  no problems found")
        for kind, paths in self.problems.items():
            print(f"  PROBLEM {kind}: {len(paths)}")
            for path in paths[:examples]:
                print(f"    {path}")
            if len(paths) > examples:
                print(f"    ... and {len(paths) - examples} more")


def prepare_parser(description: str, default_root: Path, root_help: str,
                   drive_ids: dict[str, str | None]) -> argparse.ArgumentParser:
    """The flags of every prepare script: ``--root``, ``--download``, ``--drive_id ARCHIVE=ID`` (repeatable,
    names from ``drive_ids``) and ``--check``; a script adds its own flags to the parser it gets."""
    parser = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, default=default_root, help=root_help)
    parser.add_argument("--download", action="store_true",
                        help="download the missing archives first (needs their Google Drive ids)")
    parser.add_argument("--drive_id", action="append", default=[], metavar="ARCHIVE=ID",
                        help=f"Google Drive id of an archive, one of {sorted(drive_ids)}")
    parser.add_argument("--check", action="store_true", help="only validate --root and report problems")
    return parser


def run_check(check: Callable[[Path], CheckReport], root: Path, name: str) -> int:
    """The ``--check`` branch: run the read-only ``check`` on ``root``, print its report; exit status
    0 without problems, else 1."""
    report = check(root)
    report.print(f"{name} tree {root}")
    return 0 if report.ok else 1


def check_pairs(samples: Iterable[Sample], report: CheckReport, mask_threshold: int, same_size: bool) -> int:
    """Fully decode every pair and compare the mask's content with its name; returns the pairs checked.

    Reports: unreadable/truncated images or masks, size mismatches (when ``same_size``), ratios
    outside [0, 1], names whose ratio disagrees with the mask's foreground ratio (grey > 0), and
    masks with no foreground pixel at the loader's ``mask_threshold``.
    """
    checked = 0
    for sample in samples:
        checked += 1
        try:
            with Image.open(sample.rgb_path) as image:
                image.load()
                rgb_size = image.size
        except IMAGE_ERRORS as err:
            report.add(f"unreadable image ({type(err).__name__})", sample.rgb_path)
            continue
        try:
            with Image.open(sample.mask_path) as image:
                grey = image.convert("L")
        except IMAGE_ERRORS as err:
            report.add(f"unreadable mask ({type(err).__name__})", sample.mask_path)
            continue
        if same_size and grey.size != rgb_size:
            report.add("image and mask sizes differ", sample.mask_path)
        if not 0.0 <= sample.ratio <= 1.0:
            report.add("foreground ratio in the name outside [0, 1]", sample.mask_path)
        histogram = grey.histogram()
        content_ratio = sum(histogram[1:]) / (grey.width * grey.height)
        if abs(content_ratio - sample.ratio) > RATIO_TOLERANCE:
            report.add("ratio in the name disagrees with the mask", sample.mask_path)
        if sum(histogram[mask_threshold + 1:]) == 0:
            report.add("mask has no foreground pixel", sample.mask_path)
    return checked


def scan_report(skips_paths: dict[str, list[str]], report: CheckReport) -> None:
    """Copy a `SkipLog`'s entries (missing partners, unnamed PNGs) into ``report`` as problems."""
    for reason, paths in skips_paths.items():
        for path in paths:
            report.add(reason, path)


# ----------------------------------------------------------------------------- CUB


CUB_EXPECTED = {"train": 5994, "test": 5794}
"""Images per split of the official CUB-200-2011 split."""


@dataclass(frozen=True)
class CubEntry:
    """One row of the CUB metadata: image path relative to ``images/``, split, bounding box (x, y, w, h)."""

    rel_path: str
    split: str
    bbox: tuple[float, float, float, float]


def cub_crop_box(bbox: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Bounding box grown by 10 % of its size on every side, clamped to the image, truncated to int.

    Returns (x1, y1, x2, y2): the crop is columns x1:x2, rows y1:y2.
    """
    x, y, w, h = bbox
    return (int(min(max(x - 0.1 * w, 0), width)), int(min(max(y - 0.1 * h, 0), height)),
            int(min(max(x + 1.1 * w, 0), width)), int(min(max(y + 1.1 * h, 0), height)))


def read_cub_metadata(raw: Path) -> list[CubEntry]:
    """Entries of ``images.txt``, ``train_test_split.txt`` and ``bounding_boxes.txt`` (joined on id)."""
    def table(name: str) -> dict[str, list[str]]:
        path = raw / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is {raw} the unpacked CUB_200_2011 folder?")
        return {parts[0]: parts[1:] for parts in (line.split() for line in path.read_text().splitlines()) if parts}

    images, splits, boxes = table("images.txt"), table("train_test_split.txt"), table("bounding_boxes.txt")
    entries = []
    for image_id, (rel_path,) in images.items():
        if image_id not in splits or image_id not in boxes:
            raise ValueError(f"image id {image_id} of images.txt has no split or bounding box in {raw}")
        split = "train" if splits[image_id][0] == "1" else "test"
        entries.append(CubEntry(rel_path, split, tuple(float(v) for v in boxes[image_id])))
    return entries


def prepare_cub(raw: Path, root: Path) -> dict[str, int]:
    """Crop every CUB image and segmentation into ``root/<split>/<class>/``; idempotent.

    Writes ``<name>.jpg`` (JPEG quality 100; grey images stay grey, the loader converts) and the
    cropped soft mask as ``<name>_<r>.png``, r = fraction of pixels with grey > 0. Pairs already
    present are left alone. Returns counts: ``written``, ``present``, ``no segmentation``,
    ``unreadable``, ``size mismatch``, and ``<split>`` totals.
    """
    for folder in ("images", "segmentations"):
        if not (raw / folder).is_dir():
            raise FileNotFoundError(f"{raw / folder} is missing: unpack CUB_200_2011.tgz and segmentations.tgz "
                                    f"(segmentations/ goes inside {raw})")
    counts: dict[str, int] = defaultdict(int)
    done: dict[Path, set[str]] = {}  # per output folder: stems with both files already there
    for entry in read_cub_metadata(raw):
        class_name, file_name = entry.rel_path.split("/")
        stem = Path(file_name).stem
        out_dir = root / entry.split / class_name
        if out_dir not in done:
            out_dir.mkdir(parents=True, exist_ok=True)
            names = os.listdir(out_dir)
            mask_stems = {parsed[0] for parsed in map(split_mask_name, names) if parsed}
            done[out_dir] = {Path(n).stem for n in names if n.endswith(".jpg")} & mask_stems
        counts[entry.split] += 1
        if stem in done[out_dir]:
            counts["present"] += 1
            continue
        seg_path = raw / "segmentations" / class_name / f"{stem}.png"
        if not seg_path.is_file():
            counts["no segmentation"] += 1
            continue
        try:
            with Image.open(raw / "images" / entry.rel_path) as image:
                image.load()
                rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
            with Image.open(seg_path) as seg_file:
                seg = seg_file.convert("L")
        except IMAGE_ERRORS:
            counts["unreadable"] += 1
            continue
        if rgb.size != seg.size:
            counts["size mismatch"] += 1
            continue
        box = cub_crop_box(entry.bbox, *rgb.size)
        rgb, seg = rgb.crop(box), seg.crop(box)
        rgb.save(out_dir / f"{stem}.jpg", quality=100)
        seg.save(out_dir / mask_file_name(stem, foreground_ratio(seg)))
        counts["written"] += 1
    return dict(counts)


def summarize_class_tree(mask_dir: Path, image_dir: Path, image_ext: str) -> str:
    """``"<pairs> pairs, mean foreground ratio <r>"`` of one split (from the mask names)."""
    samples = scan_class_tree(mask_dir, image_dir, image_ext, SkipLog(str(mask_dir))) if mask_dir.is_dir() else []
    mean = sum(s.ratio for s in samples) / len(samples) if samples else float("nan")
    return f"{len(samples)} pairs, mean foreground ratio {mean:.3f}"


def check_class_tree(mask_dir: Path, image_dir: Path, image_ext: str, report: CheckReport, label: str,
                     mask_threshold: int, same_size: bool) -> None:
    """``--check`` of one split of a class-folder layout (CUB, Market, synthetic)."""
    if not mask_dir.is_dir():
        report.add("missing folder", mask_dir)
        return
    skips = SkipLog(label)
    samples = scan_class_tree(mask_dir, image_dir, image_ext, skips)
    scan_report(skips.paths, report)
    report.counts[f"{label} pairs"] = check_pairs(samples, report, mask_threshold, same_size)
    if not samples:
        report.add("empty split", mask_dir)


def check_cub(root: Path) -> CheckReport:
    """Validate a prepared CUB tree without changing it."""
    report = CheckReport()
    for split, expected in CUB_EXPECTED.items():
        check_class_tree(root / split, root / split, ".jpg", report, split, mask_threshold=160, same_size=True)
        report.counts[f"{split} pairs expected (official split)"] = expected
    return report


# ----------------------------------------------------------------------------- Market


def name_market_masks(root: Path) -> dict[str, int]:
    """Give every ``seg_hmr`` mask without a ratio suffix its ``_<r>.png`` name; idempotent.

    ``<stem>.png`` becomes ``<stem>_<r>.png`` with r the fraction of pixels with grey > 0 (the
    downloaded masks normally carry the suffix already). Returns counts ``renamed``, ``named``
    (already suffixed), ``unreadable``.
    """
    counts: dict[str, int] = defaultdict(int)
    for path in sorted((root / market.MASK_FOLDER).glob("*/*/*.png")):
        if split_mask_name(path.name) is not None:
            counts["named"] += 1
            continue
        try:
            with Image.open(path) as mask:
                ratio = foreground_ratio(mask)
        except IMAGE_ERRORS:
            counts["unreadable"] += 1
            continue
        path.rename(path.with_name(mask_file_name(path.name[: -len(".png")], ratio)))
        counts["renamed"] += 1
    return dict(counts)


def check_market(root: Path) -> CheckReport:
    """Validate a Market tree (``pytorch/`` + ``seg_hmr/``) without changing it."""
    report = CheckReport()
    for split, folder in market.SPLIT_FOLDERS.items():
        check_class_tree(root / market.MASK_FOLDER / folder, root / market.IMAGE_FOLDER / folder, ".png",
                         report, f"{split} ({folder})", mask_threshold=0, same_size=False)
    return report


# ----------------------------------------------------------------------------- ATR


def fill_holes(mask: np.ndarray, iterations: int = 5) -> np.ndarray:
    """The original ATR mask clean-up on a boolean (H, W) mask; returns a new boolean mask.

    Iteration 1 is a 3x3 binary dilation; each further iteration turns a background pixel into
    foreground when at least 5 of its 8 neighbours are foreground (outside the image counts as
    background). Foreground is never removed.
    """
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    for i in range(iterations):
        counts = F.avg_pool2d(m, 3, stride=1, padding=1, divisor_override=1)  # 3x3 sums incl. centre
        m = torch.maximum(m, (counts >= (1 if i == 0 else 5)).float())
    return m[0, 0].numpy() > 0


def write_atr_masks(root: Path) -> dict[str, int]:
    """``Seg/<stem>_<r>.png`` (0/255, hole-filled person mask) for every parsing map; idempotent.

    The person is every non-zero label of ``SegmentationClassAug/<stem>.png``; r is the filled mask's
    foreground ratio. Stems that already have a Seg mask are left alone. Returns counts ``written``,
    ``present``, ``unreadable``.
    """
    parsing_dir, mask_dir = root / atr.PARSING_FOLDER, root / atr.MASK_FOLDER
    if not parsing_dir.is_dir():
        raise FileNotFoundError(f"{parsing_dir} is missing: unpack the ATR archive into {root} (or use --download)")
    mask_dir.mkdir(parents=True, exist_ok=True)
    present = set(atr.scan_masks(mask_dir))
    counts: dict[str, int] = defaultdict(int)
    for path in sorted(parsing_dir.glob("*.png")):
        if path.stem in present:
            counts["present"] += 1
            continue
        try:
            with Image.open(path) as labels:
                person = np.asarray(labels.convert("L")) > 0
        except IMAGE_ERRORS:
            counts["unreadable"] += 1
            continue
        filled = fill_holes(person)
        Image.fromarray(filled.astype(np.uint8) * 255).save(mask_dir / mask_file_name(path.stem, float(filled.mean())))
        counts["written"] += 1
    return dict(counts)


def write_atr_lists(root: Path) -> dict[str, int] | None:
    """Write ``ATR_train.txt`` / ``ATR_test.txt`` from the stems with a Seg mask (`datasets.atr.split_stems`).

    Lists already there (ours, or the original ones) are kept: returns None then, else the counts.
    """
    paths = {split: atr.split_list_path(root, split) for split in atr.SPLITS}
    if all(p.is_file() for p in paths.values()):
        return None
    stems = sorted(atr.scan_masks(root / atr.MASK_FOLDER))
    if not stems:
        raise ValueError(f"no Seg masks in {root / atr.MASK_FOLDER}: nothing to split")
    lists = dict(zip(atr.SPLITS, atr.split_stems(stems), strict=True))
    for split, path in paths.items():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{stem}\n" for stem in lists[split]))
        tmp.replace(path)
    return {split: len(lists[split]) for split in atr.SPLITS}


def check_atr(root: Path) -> CheckReport:
    """Validate a prepared ATR tree (images, Seg masks, split lists) without changing it."""
    report = CheckReport()
    image_dir, mask_dir = root / atr.IMAGE_FOLDER, root / atr.MASK_FOLDER
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            report.add("missing folder", folder)
    if not report.ok:
        return report
    masks = atr.scan_masks(mask_dir)
    images = {p.stem for p in image_dir.glob("*.jpg")}
    parsing_dir = root / atr.PARSING_FOLDER
    for path in sorted(parsing_dir.glob("*.png")) if parsing_dir.is_dir() else []:
        if path.stem not in masks:
            report.add("parsing map without a Seg mask (run prepare_ATR.py)", path)
    listed: dict[str, str] = {}
    for split in atr.SPLITS:
        list_path = atr.split_list_path(root, split)
        if not list_path.is_file():
            report.add("missing split list", list_path)
            continue
        stems = atr.read_split_list(list_path)
        report.counts[f"{split} listed"] = len(stems)
        samples = []
        for stem in stems:
            if stem in listed:
                report.add(f"stem listed twice ({listed[stem]} and {split})", stem)
            listed[stem] = split
            if stem not in masks:
                report.add("listed stem without a Seg mask", f"{mask_dir}/{stem}_*.png")
            elif stem not in images:
                report.add("listed stem without its image", image_dir / f"{stem}.jpg")
            else:
                samples.append(Sample(image_dir / f"{stem}.jpg", mask_dir / masks[stem][0], masks[stem][1], -1))
        report.counts[f"{split} pairs"] = check_pairs(samples, report, mask_threshold=0, same_size=True)
    for stem in sorted(set(masks) - set(listed)):
        report.add("Seg mask in no split list", mask_dir / masks[stem][0])
    return report
