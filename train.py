"""Train on CUB-200-2011 birds (128x128). `python train.py --help` lists every flag.

The README ("Training on CUB, ATR and Market-HQ") gives the paper's CUB command; the flag names are
the original code's.
`--dataset synthetic` trains on the embedded synthetic dataset instead (the quick start).
"""

import sys

from utils.cli import run_main
from utils.options import parse_options
from utils.trainer import train

CUB_DEFAULTS = dict(
    name="baseline", dataset="cub", dataroot="./data/CUB_Data", imageSize=128, ratio=1.0, ellipsoid=1.0,
    niter=600, em=1.0, elev_range="0~30", dist_range="2~7", bias_range=0.3,
    threshold="0.16,0.64", clean_threshold="0.25,0.49",
)


def main(argv=None) -> int:
    train(parse_options(argv, CUB_DEFAULTS))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
