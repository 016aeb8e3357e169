"""Prepare Market-HQ with the Market-Seg-HMR masks (data-eval-vis.md §2.3).

Puts the downloaded ``pytorch/`` (images) and ``seg_hmr/`` (masks) folders under ``--root`` and
gives every mask its ``_<r>.png`` foreground-ratio name (the downloaded masks normally have it; the
original script only printed the ratios). Running it again only does what is missing.

    python prepare_market.py --download   # fetch the two archives of the original README, then as below
    python prepare_market.py              # archives already in data/Market/downloads/
    python prepare_market.py --check      # validate data/Market, change nothing
"""

import sys

from datasets import DEFAULT_ROOTS
from datasets.market import IMAGE_FOLDER, MASK_FOLDER, SPLIT_FOLDERS
from datasets.prepare import (
    Archive,
    check_market,
    fetch_and_unpack,
    find_folder,
    move_into,
    name_market_masks,
    parse_drive_ids,
    prepare_parser,
    run_check,
    summarize_class_tree,
)
from utils.cli import run_main

ARCHIVES = (
    Archive("Market-HQ.zip", "10gNi3n8Iny4O4MOZRs5dNFICfj8ri9eW", ((IMAGE_FOLDER, SPLIT_FOLDERS["test"]),)),
    Archive("Market-Seg-HMR.zip", "1JwQTQA4F9WOqLAc7fhQN0DTYwnv6XrAR", ((MASK_FOLDER, SPLIT_FOLDERS["test"]),)),
)
"""The Market-HQ images and the smoothed HMR foreground masks, with the original README's Drive ids."""
MANUAL = ("the Market-HQ images ('pytorch' folder) and Market-Seg-HMR masks ('seg_hmr' folder) linked from the "
          "README of github.com/layumi/3D-Magic-Mirror")


def main(argv=None) -> int:
    parser = prepare_parser(__doc__.splitlines()[0], DEFAULT_ROOTS["market"],
                            "dataset folder (receives pytorch/ and seg_hmr/; archives go to <root>/downloads)",
                            ARCHIVES)
    args = parser.parse_args(argv)

    if args.check:
        return run_check(check_market, args.root, "Market")
    downloads = args.root / "downloads"
    fetch_and_unpack(parse_drive_ids(args.drive_id, ARCHIVES), downloads, MANUAL, args.download)
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
