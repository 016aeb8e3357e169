"""How well can the synthetic cameras be read from the images at all? A supervised upper bound.

Trains the model's camera encoder (`networks.encoders.CameraEncoder`) directly on the ground-truth
cameras of a generated cache, the synthetic shapes or the birds (`--dataset`) (L1 on (cos, sin) of the
azimuth, on the elevation and on the distance, or on the `--targets` chosen) and prints, per epoch,
its test errors next to those of a constant prediction. The self-supervised model sees no ground
truth, so it cannot beat these errors; a dataset whose azimuth this encoder cannot learn cannot be
used to measure 3-D accuracy. Prints a table; not a test.

    python bench/synthetic_camera.py                          # 2048 + 256 images of 64x64, 12 epochs
    python bench/synthetic_camera.py --classes 1 --epochs 30 --device cuda
    python bench/synthetic_camera.py --dataset birds --image_size 128 --classes 8 --root data/birds --device cuda
    python bench/synthetic_camera.py --dataset birds --classes 8 --train 1024 --targets elevation

Run from the repository root (``PYTHONPATH=.`` when the project is not installed).
"""

import argparse
import tempfile
import time

import torch

from datasets.birds import BirdsDataset, ensure_birds
from datasets.synthetic import SyntheticDataset, ensure_synthetic
from networks.encoders import CameraEncoder
from networks.losses import angle_xy
from renderer.mesh import Template
from utils.metrics import azimuth_error

KEYS = ("images", "azimuth_deg", "elevation_deg", "distance")
TARGETS = ("azimuth", "elevation", "distance")
DIST_RANGES = {"synthetic": (3.0, 6.0), "birds": (2.0, 7.0)}
"""Default camera distance ranges: the quick start's for the synthetic data, CUB's for the birds."""


def load_split(dataset_class, root, split: str, image_size: int, device: str) -> dict[str, torch.Tensor]:
    """Every item of a split, stacked: images (N,4,H,W) and the (N,) camera ground truth."""
    dataset = dataset_class(root, split, image_size, 1.0)
    items = [dataset[i] for i in range(len(dataset))]
    return {k: torch.stack([torch.as_tensor(item[k]) for item in items]).to(device) for k in KEYS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train", type=int, default=2048, help="training images")
    p.add_argument("--test", type=int, default=256, help="test images")
    p.add_argument("--image_size", type=int, default=64, help="image width and height (pixels)")
    p.add_argument("--dataset", choices=tuple(DIST_RANGES), default="synthetic", help="which generated dataset")
    p.add_argument("--classes", type=int, default=4, help="shape families / bird species of the dataset")
    p.add_argument("--dist_range", type=float, nargs=2, default=None,
                   help="camera distance range; default: synthetic 3 6, birds 2 7")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                   help="the camera values the loss supervises (the others are still reported)")
    p.add_argument("--separate_elevation_head", action="store_true",
                   help="the elevation from a head of its own (training's --separate_elevation_head)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs")
    p.add_argument("--batch", type=int, default=32, help="batch size")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="dataset seed, and initialisation seed unless --init_seed")
    p.add_argument("--init_seed", type=int, default=None,
                   help="seed of the encoder's initialisation and batch order (default: --seed), for several runs "
                   "on one dataset")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--root", default=None,
                   help="cache folder (default: a temporary folder); a cache made with the same parameters, e.g. by "
                   "train.py with the same image size, counts and seed, is reused")
    args = p.parse_args(argv)
    dist_range = tuple(args.dist_range or DIST_RANGES[args.dataset])

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.dataset == "birds":
            root = ensure_birds(args.root or tmp, args.train, args.test, args.image_size, args.seed,
                                num_classes=args.classes, distance_range=dist_range)
            dataset_class = BirdsDataset
        else:
            root = ensure_synthetic(args.root or tmp, args.train, args.test, args.image_size, 1.0, args.seed,
                                    distance_range=dist_range, num_classes=args.classes)
            dataset_class = SyntheticDataset
        train, test = (load_split(dataset_class, root, s, args.image_size, args.device) for s in ("train", "test"))

    if args.init_seed is not None:
        torch.manual_seed(args.init_seed)
    template = Template.icosphere().verts.to(args.device)
    encoder = CameraEncoder("none", dist_range=dist_range,
                            separate_elevation_head=args.separate_elevation_head).to(args.device)
    optimizer = torch.optim.Adam(encoder.parameters(), args.lr)
    elev_scale = train["elevation_deg"].std().item()  # puts the three terms on a similar scale
    dist_scale = train["distance"].std().item()

    const = {  # errors of the best constant prediction (the training mean; azimuth: any)
        "elev": (test["elevation_deg"] - train["elevation_deg"].mean()).abs().mean().item(),
        "dist": (test["distance"] - train["distance"].mean()).abs().mean().item(),
    }
    print(f"{args.dataset}: {args.train} train / {args.test} test images of {args.image_size}px, "
          f"{args.classes} classes, supervising {', '.join(args.targets)}"
          f"{' (separate elevation head)' if args.separate_elevation_head else ''}, "
          f"device {args.device}; constant prediction: azimuth ~90, elevation {const['elev']:.2f}, "
          f"distance {const['dist']:.3f}")
    print(f"{'epoch':>5} {'seconds':>8} {'azimuth err':>12} {'mirror err':>11} {'elev err':>9} {'dist err':>9}")
    start = time.perf_counter()
    for epoch in range(args.epochs):
        encoder.train()
        order = torch.randperm(args.train, device=args.device)
        for first in range(0, args.train - args.batch + 1, args.batch):
            b = order[first:first + args.batch]
            azimuth, elevation, distance, _ = encoder(train["images"][b], template)
            terms = {"azimuth": (angle_xy(azimuth) - angle_xy(train["azimuth_deg"][b])).abs().mean(),
                     "elevation": (elevation - train["elevation_deg"][b]).abs().mean() / elev_scale,
                     "distance": (distance - train["distance"][b]).abs().mean() / dist_scale}
            loss = sum(terms[t] for t in args.targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        encoder.eval()
        with torch.no_grad():
            azimuth, elevation, distance, _ = encoder(test["images"], template)
        print(f"{epoch:>5} {time.perf_counter() - start:>8.0f} "
              f"{azimuth_error(azimuth, test['azimuth_deg']).mean():>12.1f} "
              f"{azimuth_error(azimuth, test['azimuth_deg'], mirror=True).mean():>11.1f} "
              f"{(elevation - test['elevation_deg']).abs().mean():>9.2f} "
              f"{(distance - test['distance']).abs().mean():>9.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
