"""What ``prepare_cub.py``, ``prepare_market.py`` and ``prepare_ATR.py`` do (the scripts only parse flags).

Per dataset: `prepare_cub` / `check_cub`, `name_market_masks` / `check_market`, `write_atr_masks` +
`write_atr_lists` / `check_atr`. Every preparation step is idempotent (work already done is
detected and skipped) and every check is read-only. Shared steps:

* `Archive`: one archive of the original README (file name, Google Drive id, expected layout);
  each script lists its archives with the ids of the original README (``--drive_id NAME=ID``
  overrides one).
* `download_from_drive`: the only network step, a thin wrapper around gdown (to ``<name>.part``,
  renamed when complete). Offline or on a failure it stops with a message saying what to fetch by
  hand and where to put it.
* `check_archive`, `unpack`, `fetch_and_unpack`: every archive is read completely and its layout
  checked before it is extracted (a bad one is set aside as ``<name>.rejected``); extraction goes
  through a staging folder and a marker file records completion, so an interrupted run leaves
  nothing that looks complete and the next run resumes.
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
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

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


@dataclass(frozen=True)
class Archive:
    """One archive a prepare script (or `download_models.py`) can fetch and unpack.

    Attributes:
        name: file name in the downloads folder (zip or tar is told by content, not by the name).
        drive_id: Google Drive id from the original README, or None where the file is not on Drive.
        holds: the layout the archive must have: each entry is a run of consecutive path parts
            (folder or file names) that must appear in some member's path, e.g. ``("pytorch", "query")``.
    """

    name: str
    drive_id: str | None
    holds: tuple[tuple[str, ...], ...]

    def layout(self) -> str:
        """The expected layout in words, for error messages."""
        return " and ".join("/".join(names) for names in self.holds)


class ArchiveError(RunError):
    """A downloaded or dropped-in archive that is incomplete or does not hold the expected layout."""


def parse_drive_ids(pairs: Iterable[str], archives: Iterable[Archive]) -> list[Archive]:
    """``archives`` with the ids of ``NAME=ID`` pairs from the command line; ValueError on unknown names."""
    by_name = {a.name: a for a in archives}
    for pair in pairs:
        name, sep, file_id = pair.partition("=")
        if not sep or name not in by_name or not file_id:
            raise ValueError(f"--drive_id expects NAME=ID with NAME one of {sorted(by_name)}, got {pair!r}")
        by_name[name] = replace(by_name[name], drive_id=file_id)
    return list(by_name.values())


def download_from_drive(archive: Archive, folder: Path, manual: str) -> Path:
    """Download ``archive`` into ``folder`` with gdown (the only network step); returns its path.

    The file is written as ``<name>.part`` and renamed when complete, so an interrupted download
    never looks like an archive. Raises RunError naming ``manual`` (where to get it by hand and
    where to put it) when there is no id or the download fails (offline, quota, moved file).
    """
    path = folder / archive.name
    by_hand = f"Get it by hand ({manual}), save it as {path} and run the script again"
    if archive.drive_id is None:
        raise RunError(f"No Google Drive id is known for {archive.name}. {by_hand} "
                           "(or pass --drive_id NAME=ID).")
    import gdown  # only needed (and only able to work) with network access

    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.part")
    try:
        result = gdown.download(id=archive.drive_id, output=str(partial), quiet=False)
    except Exception as err:  # gdown and requests report offline / quota / moved files in many types
        result, reason = None, f"{type(err).__name__}: {err}"
    else:
        reason = "gdown returned nothing"
    if result is None or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise RunError(f"downloading {archive.name} (Google Drive id {archive.drive_id}) failed ({reason}). "
                           f"{by_hand}.")
    partial.replace(path)
    return path


def _member_paths(path: Path) -> list[str]:
    """Names of every member of a zip or tar file after reading all of its data (CRC / stream checked).

    Raises ArchiveError for a file that is neither, or is truncated or corrupt.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise ArchiveError(f"{path} is corrupt (member {bad} fails its CRC check)")
                return zf.namelist()
        if tarfile.is_tarfile(path):
            names = []
            with tarfile.open(path) as tf:
                for member in tf:  # reading every member to the end finds a truncated stream
                    names.append(member.name)
                    if member.isfile():
                        with tf.extractfile(member) as data:
                            while data.read(1 << 20):
                                pass
            return names
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error) as err:
        raise ArchiveError(f"{path} is truncated or corrupt ({type(err).__name__}: {err})") from err
    raise ArchiveError(f"{path} is not a complete zip or tar archive (truncated download?)")


def check_archive(path: Path, archive: Archive) -> None:
    """Raise ArchiveError unless ``path`` is a complete zip/tar holding ``archive.holds``."""
    folders = [PurePosixPath(name).parts for name in _member_paths(path)]
    for names in archive.holds:
        k = len(names)
        if not any(parts[i:i + k] == names for parts in folders for i in range(len(parts) - k + 1)):
            raise ArchiveError(f"{path} does not have the layout of {archive.name} (expected {archive.layout()} "
                               f"inside, missing {'/'.join(names)})")


def unpack(archive: Path, destination: Path, expected: Archive | None = None) -> bool:
    """Extract a zip or tar ``archive`` into ``destination`` unless done before; True if it extracted now.

    The archive is first checked (`check_archive`, when ``expected`` is given; a bad file is renamed
    ``<name>.rejected`` so that ``--download`` fetches it again, and ArchiveError says so). It is
    then extracted into ``destination/.<name>.partial/`` and its top-level entries are moved into
    ``destination`` (entries already there are kept), so an interrupted extraction never leaves a
    half-filled folder where the loaders look; the next run starts the extraction again. A marker
    ``.<name>.unpacked`` records completion. Tar members are extracted with the "data" filter (no
    absolute paths, no links out of ``destination``).
    """
    marker = destination / f".{archive.name}.unpacked"
    if marker.exists():
        return False
    if expected is not None:
        try:
            check_archive(archive, expected)
        except ArchiveError as err:
            rejected = archive.with_name(f"{archive.name}.rejected")
            archive.replace(rejected)
            raise ArchiveError(f"{err}. It was renamed {rejected.name}: run the script with --download again to "
                               "fetch it anew, or put a good copy in its place.") from err
    staging = destination / f".{archive.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run
    staging.mkdir(parents=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(staging, filter="data")
    for entry in sorted(staging.iterdir()):
        if not (destination / entry.name).exists():
            entry.replace(destination / entry.name)
    shutil.rmtree(staging)
    marker.touch()
    return True


def fetch_and_unpack(archives: Iterable[Archive], folder: Path, manual: str, download: bool,
                     in_place: bool = False) -> None:
    """With ``download``, fetch the ``archives`` missing from ``folder``; then check and unpack each one
    present; print each unpacked now.

    With ``in_place`` each archive is unpacked straight into ``folder`` (CUB's raw tarballs hold their
    own top folder); otherwise into its own ``folder/<name>.d/``. Raises RunError (download) and
    ArchiveError (bad archive).
    """
    for archive in archives:
        path = folder / archive.name
        if download and not path.is_file():
            download_from_drive(archive, folder, manual)
        if path.is_file() and unpack(path, folder if in_place else folder / f"{archive.name}.d", archive):
            print(f"unpacked {path}")


def find_folder(search_root: Path, name: str, containing: Iterable[str] = ()) -> Path | None:
    """The shallowest folder called ``name`` under ``search_root`` holding every entry in ``containing``;
    ``name="*"`` accepts any folder, ``search_root`` itself included."""
    candidates = [*search_root.rglob(name), *([search_root] if name == "*" else [])]
    for path in sorted(candidates, key=lambda p: (len(p.parts), str(p))):
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
                   archives: Iterable[Archive]) -> argparse.ArgumentParser:
    """The flags of every prepare script: ``--root``, ``--download``, ``--drive_id ARCHIVE=ID`` (repeatable,
    names from ``archives``) and ``--check``; a script adds its own flags to the parser it gets."""
    parser = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, default=default_root, help=root_help)
    parser.add_argument("--download", action="store_true",
                        help="download the missing archives first (Google Drive ids of the original README)")
    parser.add_argument("--drive_id", action="append", default=[], metavar="ARCHIVE=ID",
                        help=f"another Google Drive id for an archive, one of {sorted(a.name for a in archives)}")
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
                                    f"(segmentations/ goes inside {raw}), or run prepare_cub.py --download to fetch "
                                    "the processed CUB_Data of the original README")
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
