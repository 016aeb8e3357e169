"""Prepare the ATR human-parsing data (data-eval-vis.md §2.4).

Writes a binary, hole-filled person mask ``Seg/<stem>_<r>.png`` for every parsing map in
``SegmentationClassAug/`` and, unless they exist, the split lists ``ATR_train.txt`` /
``ATR_test.txt`` (16,000 / 1,706 with the original per-prefix counts; see `datasets.atr`). Running
it again only does what is missing.

    python prepare_ATR.py --download --drive_id ATR.zip=ID
    python prepare_ATR.py                 # archive already in data/ATR/downloads/, or folders in data/ATR
    python prepare_ATR.py --check         # validate data/ATR, change nothing
"""

import argparse
import sys
from pathlib import Path

from datasets import DEFAULT_ROOTS
from datasets.atr import IMAGE_FOLDER, PARSING_FOLDER
from datasets.prepare import (
    check_atr,
    fetch_archives,
    find_folder,
    move_into,
    parse_drive_ids,
    unpack_all,
    write_atr_lists,
    write_atr_masks,
)

DRIVE_IDS: dict[str, str | None] = {"ATR.zip": None}
"""Archive -> Google Drive id of the original README's link; not recorded offline, so None."""
MANUAL = ("the processed ATR data ('humanparsing' with JPEGImages/ and SegmentationClassAug/) linked from the "
          "README of github.com/layumi/3D-Magic-Mirror")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOTS["atr"],
                        help="dataset folder (receives JPEGImages/, SegmentationClassAug/, Seg/ and the lists)")
    parser.add_argument("--download", action="store_true", help="download the archive first (needs its id)")
    parser.add_argument("--drive_id", action="append", default=[], metavar="ARCHIVE=ID",
                        help=f"Google Drive id of an archive, one of {sorted(DRIVE_IDS)}")
    parser.add_argument("--check", action="store_true", help="only validate --root and report problems")
    args = parser.parse_args(argv)

    if args.check:
        report = check_atr(args.root)
        report.print(f"ATR tree {args.root}")
        return 0 if report.ok else 1
    downloads = args.root / "downloads"
    try:
        if args.download:
            fetch_archives(parse_drive_ids(args.drive_id, DRIVE_IDS), downloads, MANUAL)
        for archive in unpack_all(downloads):
            print(f"unpacked {archive}")
        for folder in (IMAGE_FOLDER, PARSING_FOLDER):
            if not (args.root / folder).is_dir() and downloads.is_dir():
                move_into(find_folder(downloads, folder), args.root / folder)
        masks = write_atr_masks(args.root)
        lists = write_atr_lists(args.root)
    except (OSError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"ATR: {masks.get('written', 0)} masks written, {masks.get('present', 0)} already present, "
          f"{masks.get('unreadable', 0)} unreadable parsing maps")
    if lists is None:
        print("  split lists already present, kept")
    else:
        print(f"  split lists written: train {lists['train']}, test {lists['test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
