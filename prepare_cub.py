"""Prepare CUB-200-2011 for training (data-eval-vis.md §2.2).

Crops every image and its segmentation to the bounding box grown by 10 % and writes
``<root>/{train,test}/<class>/<name>.jpg`` + ``<name>_<r>.png`` (r = foreground ratio), the layout
`datasets.cub.CUBDataset` reads. One step replaces the original's ``preproces_cub.py`` +
``prepare_cub.py``; running it again only does what is missing.

    python prepare_cub.py                 # unpack data/*.tgz if needed, then crop into data/CUB_Data
    python prepare_cub.py --check         # validate data/CUB_Data, change nothing
"""

import sys
from pathlib import Path

from datasets import DEFAULT_ROOTS
from datasets.prepare import (
    check_cub,
    fetch_and_unpack,
    move_into,
    prepare_cub,
    prepare_parser,
    run_check,
    summarize_class_tree,
)
from utils.cli import run_main

DRIVE_IDS: dict[str, str | None] = {"CUB_200_2011.tgz": None, "segmentations.tgz": None}
"""Archive -> Google Drive id. CUB is published by Caltech, not on Google Drive; no id is known."""
MANUAL = ("CUB_200_2011.tgz and segmentations.tgz from the Caltech CUB-200-2011 page, "
          "https://www.vision.caltech.edu/datasets/cub_200_2011/")


def main(argv=None) -> int:
    parser = prepare_parser(__doc__.splitlines()[0], DEFAULT_ROOTS["cub"], "prepared dataset folder", DRIVE_IDS)
    parser.add_argument("--raw", type=Path, default=Path("data/CUB_200_2011"),
                        help="unpacked CUB_200_2011 folder (images/, segmentations/, *.txt)")
    parser.add_argument("--archives", type=Path, default=Path("data"),
                        help="folder holding (or receiving) CUB_200_2011.tgz and segmentations.tgz")
    args = parser.parse_args(argv)

    if args.check:
        return run_check(check_cub, args.root, "CUB")
    fetch_and_unpack(args, DRIVE_IDS, args.archives, MANUAL, in_place=True)
    move_into(args.archives / "CUB_200_2011", args.raw)
    move_into(args.archives / "segmentations", args.raw / "segmentations")
    counts = prepare_cub(args.raw, args.root)
    print(f"CUB: {counts.get('written', 0)} pairs written, {counts.get('present', 0)} already present")
    for reason in ("no segmentation", "unreadable", "size mismatch"):
        if counts.get(reason):
            print(f"  skipped ({reason}): {counts[reason]}")
    for split in ("train", "test"):
        print(f"  {split}: {summarize_class_tree(args.root / split, args.root / split, '.jpg')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
