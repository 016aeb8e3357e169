"""Train on Market-HQ people (64 wide x 128 high). `python train_market.py --help` lists every flag.

The README ("Training on CUB, ATR and Market-HQ") gives the paper's Market command; the flag names are
the original code's.
"""

import sys

from utils.cli import run_main
from utils.options import parse_options
from utils.trainer import train

MARKET_DEFAULTS = dict(
    name="baseline-MKT", dataset="market", dataroot="./data/Market", imageSize=128, ratio=2.0,
    ellipsoid=2.0, niter=600, em=0.0, elev_range="-15~15", dist_range="2~6", bias_range=0.5,
    threshold="0.09,0.64", clean_threshold="0.3,0.64",
)


def main(argv=None) -> int:
    train(parse_options(argv, MARKET_DEFAULTS))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
