"""How well can the synthetic cameras be read from the images at all? A supervised upper bound.

Trains the model's camera encoder (`networks.encoders.CameraEncoder`) directly on the ground-truth
cameras of a synthetic cache (L1 on (cos, sin) of the azimuth, on the elevation and on the distance)
and prints, per epoch, its test errors next to those of a constant prediction. The self-supervised
model sees no ground truth, so it cannot beat these errors; a dataset whose azimuth this encoder
cannot learn cannot be used to measure 3-D accuracy. Prints a table; not a test.

    python bench/synthetic_camera.py                          # 2048 + 256 images of 64x64, 12 epochs
    python bench/synthetic_camera.py --classes 1 --epochs 30 --device cuda

Run from the repository root (``PYTHONPATH=.`` when the project is not installed).
"""

import argparse
import tempfile
import time

import torch

from datasets.synthetic import SyntheticDataset, ensure_synthetic
from networks.encoders import CameraEncoder
from networks.losses import angle_xy
from renderer.mesh import Template
from utils.metrics import azimuth_error

KEYS = ("images", "azimuth_deg", "elevation_deg", "distance")


def load_split(root, split: str, image_size: int, device: str) -> dict[str, torch.Tensor]:
    """Every item of a split, stacked: images (N,4,H,W) and the (N,) camera ground truth."""
    dataset = SyntheticDataset(root, split, image_size, 1.0)
    items = [dataset[i] for i in range(len(dataset))]
    return {k: torch.stack([torch.as_tensor(item[k]) for item in items]).to(device) for k in KEYS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train", type=int, default=2048, help="training images")
    p.add_argument("--test", type=int, default=256, help="test images")
    p.add_argument("--image_size", type=int, default=64, help="image width and height (pixels)")
    p.add_argument("--classes", type=int, default=4, help="shape families of the synthetic dataset")
    p.add_argument("--dist_range", type=float, nargs=2, default=(3.0, 6.0), help="camera distance range")
    p.add_argument("--epochs", type=int, default=12, help="training epochs")
    p.add_argument("--batch", type=int, default=32, help="batch size")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="dataset and initialisation seed")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--root", default=None, help="synthetic cache folder (default: a temporary folder)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_synthetic(args.root or tmp, args.train, args.test, args.image_size, 1.0, args.seed,
                                distance_range=tuple(args.dist_range), num_classes=args.classes)
        train, test = (load_split(root, s, args.image_size, args.device) for s in ("train", "test"))

    template = Template.icosphere().verts.to(args.device)
    encoder = CameraEncoder("none", dist_range=tuple(args.dist_range)).to(args.device)
    optimizer = torch.optim.Adam(encoder.parameters(), args.lr)
    elev_scale = train["elevation_deg"].std().item()  # puts the three terms on a similar scale
    dist_scale = train["distance"].std().item()

    const = {  # errors of the best constant prediction (the training mean; azimuth: any)
        "elev": (test["elevation_deg"] - train["elevation_deg"].mean()).abs().mean().item(),
        "dist": (test["distance"] - train["distance"].mean()).abs().mean().item(),
    }
    print(f"{args.train} train / {args.test} test images of {args.image_size}px, {args.classes} families, "
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
            loss = ((angle_xy(azimuth) - angle_xy(train["azimuth_deg"][b])).abs().mean()
                    + (elevation - train["elevation_deg"][b]).abs().mean() / elev_scale
                    + (distance - train["distance"][b]).abs().mean() / dist_scale)
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
