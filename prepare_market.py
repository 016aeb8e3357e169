"""Prepare Market-HQ with the Market-Seg-HMR masks (data-eval-vis.md §2.3).

Puts the downloaded ``pytorch/`` (images) and ``seg_hmr/`` (masks) folders under ``--root`` and
gives every mask its ``_<r>.png`` foreground-ratio name (the downloaded masks normally have it; the
original script only printed the ratios). Running it again only does what is missing.

    python prepare_market.py --download --drive_id Market-HQ.zip=ID --drive_id Market-Seg-HMR.zip=ID
    python prepare_market.py              # archives already in data/Market/downloads/
    python prepare_market.py --check      # validate data/Market, change nothing
"""

import sys

from datasets import DEFAULT_ROOTS
from datasets.market import IMAGE_FOLDER, MASK_FOLDER, SPLIT_FOLDERS
from datasets.prepare import (
    check_market,
    fetch_and_unpack,
    find_folder,
    move_into,
    name_market_masks,
    prepare_parser,
    run_check,
    summarize_class_tree,
)
from utils.cli import run_main

DRIVE_IDS: dict[str, str | None] = {"Market-HQ.zip": None, "Market-Seg-HMR.zip": None}
"""Archive -> Google Drive id of the original README's links; not recorded offline, so None."""
MANUAL = ("the Market-HQ images ('pytorch' folder) and Market-Seg-HMR masks linked from the README of "
          "github.com/layumi/3D-Magic-Mirror")


def main(argv=None) -> int:
    parser = prepare_parser(__doc__.splitlines()[0], DEFAULT_ROOTS["market"],
                            "dataset folder (receives pytorch/ and seg_hmr/; archives go to <root>/downloads)",
                            DRIVE_IDS)
    args = parser.parse_args(argv)

    if args.check:
        return run_check(check_market, args.root, "Market")
    downloads = args.root / "downloads"
    fetch_and_unpack(args, DRIVE_IDS, downloads, MANUAL)
    for folder in (IMAGE_FOLDER, MASK_FOLDER):
        if not (args.root / folder).is_dir() and downloads.is_dir():
            move_into(find_folder(downloads, folder, containing=(SPLIT_FOLDERS["test"],)), args.root / folder)
        if not (args.root / folder).is_dir():
            raise FileNotFoundError(f"{args.root / folder} is missing: get {MANUAL} and unpack them into "
                                    f"{downloads} (or use --download)")
    counts = name_market_masks(args.root)
    print(f"Market: {counts.get('renamed', 0)} masks given a ratio name, {counts.get('named', 0)} already named, "
          f"{counts.get('unreadable', 0)} unreadable")
    for split, folder in SPLIT_FOLDERS.items():
        summary = summarize_class_tree(args.root / MASK_FOLDER / folder, args.root / IMAGE_FOLDER / folder, ".png")
        print(f"  {split} ({folder}): {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
