"""Download the original's trained models into log/<run>/, where its README puts them.

    python download_models.py             # both released models (CUB birds and Market-HQ people)
    python download_models.py market      # or only one: cub | market

Each archive (Google Drive id of the original README) is downloaded to ``<log_root>/downloads/``,
read completely and checked for ``ckpts/best_ckpt.pth`` and ``ckpts/best_mesh.obj``, unpacked
through a staging folder and moved to ``<log_root>/<run>/``; a run already in place is skipped, and
an interrupted run resumes. Then ``python test.py --name RUN``, ``show_rainbow2.py`` and ``demo.py``
use it directly (converted once on first use, see `utils.released`).
"""

import argparse
import sys
from pathlib import Path

from datasets.prepare import Archive, fetch_and_unpack, find_folder, move_into
from utils.cli import ArgumentParser, run_main
from utils.released import ORIGINAL_CHECKPOINT, ORIGINAL_MESH, RELEASED_RUNS

MANUAL = ("the trained model linked from the README of github.com/layumi/3D-Magic-Mirror; unpack it so that "
          "{run_dir}/ckpts/best_ckpt.pth exists")


def fetch_model(which: str, log_root: Path) -> Path:
    """Put the released run ``which`` ('cub' or 'market') into ``log_root/<run>/``; returns that folder.

    Raises `utils.cli.RunError` (download), `datasets.prepare.ArchiveError` (incomplete archive or another
    layout) and FileExistsError (a folder of that name without the checkpoint is in the way).
    """
    run = RELEASED_RUNS[which]
    run_dir = log_root / run.name
    if (run_dir / ORIGINAL_CHECKPOINT).is_file() and (run_dir / ORIGINAL_MESH).is_file():
        print(f"{which}: {run_dir} is already in place")
        return run_dir
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} exists but lacks {ORIGINAL_CHECKPOINT} or {ORIGINAL_MESH}: move it away and "
                              "run download_models.py again")
    archive = Archive(f"{run.name}.zip", run.drive_id, (ORIGINAL_CHECKPOINT.parts, ORIGINAL_MESH.parts))
    downloads = log_root / "downloads"
    fetch_and_unpack([archive], downloads, MANUAL.format(run_dir=run_dir), download=True)
    unpacked = downloads / f"{archive.name}.d"
    move_into(find_folder(unpacked, "*", containing=(str(ORIGINAL_CHECKPOINT), str(ORIGINAL_MESH))), run_dir)
    print(f"{which}: {run_dir} ready; python test.py --name {run.name}")
    return run_dir


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("which", nargs="?", choices=(*RELEASED_RUNS, "all"), default="all",
                        help="which released model to download")
    parser.add_argument("--log_root", type=Path, default=Path("log"), help="folder that holds the run folders")
    args = parser.parse_args(argv)
    for which in RELEASED_RUNS if args.which == "all" else (args.which,):
        fetch_model(which, args.log_root)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
