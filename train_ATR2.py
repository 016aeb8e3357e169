"""Train on ATR human parsing (96 wide x 160 high). `python train_ATR2.py --help` lists every flag.

The README ("Training on CUB, ATR and Market-HQ") gives the paper's ATR command; the flag names are
the original code's.
"""

import sys

from utils.cli import run_main
from utils.options import parse_options
from utils.trainer import train

ATR_DEFAULTS = dict(
    name="ATR2_baseline", dataset="atr", dataroot="./data/ATR", imageSize=64, ratio=2.0,
    ellipsoid=2.0, niter=500, em=1.0, elev_range="-15~15", dist_range="2~8", bias_range=0.5,
    threshold="0.09,0.49", clean_threshold="0.16,0.36",
)


def main(argv=None) -> int:
    train(parse_options(argv, ATR_DEFAULTS))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
