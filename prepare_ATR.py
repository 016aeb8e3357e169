"""Prepare the ATR human-parsing data (data-eval-vis.md §2.4).

Writes a binary, hole-filled person mask ``Seg/<stem>_<r>.png`` for every parsing map in
``SegmentationClassAug/`` and, unless they exist, the split lists ``ATR_train.txt`` /
``ATR_test.txt`` (16,000 / 1,706 with the original per-prefix counts; see `datasets.atr`). Running
it again only does what is missing.

    python prepare_ATR.py --download      # fetch the processed ATR archive of the original README
    python prepare_ATR.py                 # archive already in data/ATR/downloads/, or folders in data/ATR
    python prepare_ATR.py --check         # validate data/ATR, change nothing
"""

import sys

from datasets import DEFAULT_ROOTS
from datasets.atr import IMAGE_FOLDER, PARSING_FOLDER
from datasets.prepare import (
    Archive,
    check_atr,
    fetch_and_unpack,
    find_folder,
    move_into,
    parse_drive_ids,
    prepare_parser,
    run_check,
    write_atr_lists,
    write_atr_masks,
)
from utils.cli import run_main

ARCHIVES = (Archive("ATR.zip", "1kpsMDrbM4FQqtP7Y1nKslp4OlRKNvbaL", ((IMAGE_FOLDER,), (PARSING_FOLDER,))),)
"""The processed ATR data, with the original README's Drive id."""
MANUAL = ("the processed ATR data ('humanparsing' with JPEGImages/ and SegmentationClassAug/) linked from the "
          "README of github.com/layumi/3D-Magic-Mirror")


def main(argv=None) -> int:
    parser = prepare_parser(__doc__.splitlines()[0], DEFAULT_ROOTS["atr"],
                            "dataset folder (receives JPEGImages/, SegmentationClassAug/, Seg/ and the lists)",
                            ARCHIVES)
    args = parser.parse_args(argv)

    if args.check:
        return run_check(check_atr, args.root, "ATR")
    downloads = args.root / "downloads"
    fetch_and_unpack(parse_drive_ids(args.drive_id, ARCHIVES), downloads, MANUAL, args.download)
    for folder in (IMAGE_FOLDER, PARSING_FOLDER):
        if not (args.root / folder).is_dir() and downloads.is_dir():
            move_into(find_folder(downloads, folder), args.root / folder)
    masks = write_atr_masks(args.root)
    lists = write_atr_lists(args.root)
    print(f"ATR: {masks.get('written', 0)} masks written, {masks.get('present', 0)} already present, "
          f"{masks.get('unreadable', 0)} unreadable parsing maps")
    if lists is None:
        print("  split lists already present, kept")
    else:
        print(f"  split lists written: train {lists['train']}, test {lists['test']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
