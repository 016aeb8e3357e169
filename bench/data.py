"""Data-loader throughput: images/s of each dataset's loader at the training batch size.

Builds trees in the real layouts in a temporary folder (fixture trees with noisy, photo-sized images
for CUB, Market and ATR, so decoding costs what it costs on real data; generated synthetic and bird caches),
then times ``DataLoader(shuffle, drop_last, persistent workers, prefetch 3)`` over full batches, after
draining the batches the workers prefetched at start (steady state). Prints a table; not a test.

    python bench/data.py                      # 4 workers (the training default), batch 48
    python bench/data.py --workers 0 8 --batches 30
    python bench/data.py --datasets --generate 2000 --device cuda   # synthetic generation time only
    python bench/data.py --datasets --generate 300 --generators birds   # bird generation time only (CPU)

Run from the repository root (``PYTHONPATH=.`` when the project is not installed).
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets import build_dataset
from datasets.birds import ensure_birds
from datasets.fixtures import write_atr_tree, write_cub_tree, write_market_tree
from datasets.synthetic import ensure_synthetic

PREFETCH = 3  # batches each worker prepares ahead, as in the training scripts

# name: (image size W, ratio, source image size (w, h) of the fixture files)
SETTINGS = {
    "cub": (128, 1.0, (320, 288)),  # bounding-box crops of ~500x375 photos
    "market": (64, 2.0, (128, 256)),
    "atr": (96, 1.666666, (400, 600)),
    "synthetic": (128, 1.0, None),
    "birds": (128, 1.0, None),
}
GENERATORS = {  # name -> (root, train images, device) -> cache of 128x128 images (+ 1 test image)
    "synthetic": lambda root, count, device: ensure_synthetic(root, count, 1, 128, 1.0, seed=0, device=device),
    "birds": lambda root, count, device: ensure_birds(root, count, 1, 128, seed=0),  # Mitsuba: CPU only
}


def add_noise(folder: Path, pattern: str, seed: int) -> None:
    """Re-save every RGB file matching ``pattern`` with pixel noise (realistic file size and decode cost)."""
    rng = np.random.default_rng(seed)
    for path in sorted(folder.rglob(pattern)):
        if "_0." in path.name:  # a mask
            continue
        rgb = np.asarray(Image.open(path).convert("RGB"), np.int16)
        noisy = np.clip(rgb + rng.integers(-40, 41, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def make_tree(name: str, root: Path, count: int) -> Path:
    ratios = list(np.linspace(0.2, 0.6, count).round(2))
    size = SETTINGS[name][2]
    if name == "cub":
        write_cub_tree(root, {"train": ratios}, size=size)
        add_noise(root, "*.jpg", 0)
    elif name == "market":
        write_market_tree(root, {"train": ratios}, size=size)
        add_noise(root / "pytorch", "*.png", 1)
    elif name == "atr":
        write_atr_tree(root, {"train": ratios}, size=size)
        add_noise(root / "JPEGImages", "*.jpg", 2)
    else:
        GENERATORS[name](root, count, "cpu")
    return root


def images_per_second(dataset, batch: int, workers: int, batches: int) -> float:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=PREFETCH if workers > 0 else None)

    def endless():
        while True:
            yield from loader

    stream = endless()
    # Start the workers and drain the batches they prefetch, so the timing sees the steady state.
    for _ in range(1 + workers * PREFETCH):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--workers", type=int, nargs="+", default=[4], help="worker counts to time")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--files", type=int, default=200, help="images per fixture tree")
    parser.add_argument("--generate", type=int, default=0,
                        help="also time generating caches of this many 128x128 train images (see --generators)")
    parser.add_argument("--generators", nargs="+", default=["synthetic"], choices=list(GENERATORS),
                        help="the generated datasets --generate times")
    parser.add_argument("--device", default="cpu", help="render device of the synthetic generation")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch}, {args.batches} timed batches")
    print(f"{'dataset':<10} {'output WxH':>10} {'source':>9} {'workers':>7} {'images/s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            width, ratio, source = SETTINGS[name]
            root = make_tree(name, Path(tmp) / name, args.files)
            dataset = build_dataset(name, root, "train", width, ratio, None, aug=True, bg=True)
            source_text = "x".join(map(str, source)) if source else "rendered"
            for workers in args.workers:
                rate = images_per_second(dataset, args.batch, workers, args.batches)
                print(f"{name:<10} {f'{width}x{round(ratio * width)}':>10} {source_text:>9} {workers:>7} {rate:>9.0f}")
        for name in args.generators if args.generate else []:
            device = args.device if name == "synthetic" else "cpu"
            start = time.perf_counter()
            GENERATORS[name](Path(tmp) / f"generated_{name}", args.generate, device)
            seconds = time.perf_counter() - start
            print(f"{name} generation: {args.generate + 1} images at 128x128 on {device} in {seconds:.1f} s "
                  f"({(args.generate + 1) / seconds:.1f} images/s)")


if __name__ == "__main__":
    main()
