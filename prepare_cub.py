"""Prepare CUB-200-2011 for training (data-eval-vis.md §2.2).

Two sources are accepted. The processed ``CUB_Data`` archive of the original README (``--download``
fetches it) is already in the layout `datasets.cub.CUBDataset` reads and is only unpacked into
``--root``. The raw Caltech tarballs (``CUB_200_2011.tgz`` + ``segmentations.tgz`` in ``--archives``)
are unpacked and every image and its segmentation cropped to the bounding box grown by 10 % into
``<root>/{train,test}/<class>/<name>.jpg`` + ``<name>_<r>.png`` (r = foreground ratio); that one step
replaces the original's ``preproces_cub.py`` + ``prepare_cub.py``. Running it again only does what is
missing.

    python prepare_cub.py --download      # fetch + unpack the processed CUB_Data into data/CUB_Data
    python prepare_cub.py                 # or: unpack data/*.tgz if needed, then crop into data/CUB_Data
    python prepare_cub.py --check         # validate data/CUB_Data, change nothing
"""

import sys
from pathlib import Path

from datasets import DEFAULT_ROOTS
from datasets.prepare import (
    Archive,
    check_cub,
    fetch_and_unpack,
    find_folder,
    move_into,
    parse_drive_ids,
    prepare_cub,
    prepare_parser,
    run_check,
    summarize_class_tree,
)
from utils.cli import run_main

PROCESSED = Archive("CUB_Data.zip", "1SkX_FWUfLOaTr371TBkQnDH9oDJ5Khwc", (("train",), ("test",)))
"""The processed CUB_Data of the original README ("ready to run after download")."""
RAW = (Archive("CUB_200_2011.tgz", None, (("CUB_200_2011", "images"),)),
       Archive("segmentations.tgz", None, (("segmentations",),)))
"""The Caltech tarballs: not on Google Drive, so only unpacked when they are present."""
MANUAL = ("the processed CUB_Data archive linked from the README of github.com/layumi/3D-Magic-Mirror, or "
          "CUB_200_2011.tgz and segmentations.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/")


def main(argv=None) -> int:
    parser = prepare_parser(__doc__.splitlines()[0], DEFAULT_ROOTS["cub"], "prepared dataset folder",
                            (PROCESSED, *RAW))
    parser.add_argument("--raw", type=Path, default=Path("data/CUB_200_2011"),
                        help="unpacked CUB_200_2011 folder (images/, segmentations/, *.txt)")
    parser.add_argument("--archives", type=Path, default=Path("data"),
                        help="folder holding (or receiving) the CUB_Data archive or CUB_200_2011.tgz and "
                        "segmentations.tgz")
    args = parser.parse_args(argv)

    if args.check:
        return run_check(check_cub, args.root, "CUB")
    processed, *raw = parse_drive_ids(args.drive_id, (PROCESSED, *RAW))
    fetch_and_unpack([processed], args.archives, MANUAL, args.download)
    unpacked = args.archives / f"{processed.name}.d"
    if unpacked.is_dir():
        move_into(find_folder(unpacked, "*", containing=("train", "test")), args.root)
    fetch_and_unpack(raw, args.archives, MANUAL, download=False, in_place=True)
    move_into(args.archives / "CUB_200_2011", args.raw)
    move_into(args.archives / "segmentations", args.raw / "segmentations")
    if not args.raw.is_dir() and (args.root / "train").is_dir() and (args.root / "test").is_dir():
        print(f"CUB: processed tree in {args.root} (python prepare_cub.py --check validates it)")
        counts = None
    else:
        counts = prepare_cub(args.raw, args.root)
    if counts is not None:
        print(f"CUB: {counts.get('written', 0)} pairs written, {counts.get('present', 0)} already present")
        for reason in ("no segmentation", "unreadable", "size mismatch"):
            if counts.get(reason):
                print(f"  skipped ({reason}): {counts[reason]}")
    for split in ("train", "test"):
        print(f"  {split}: {summarize_class_tree(args.root / split, args.root / split, '.jpg')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
