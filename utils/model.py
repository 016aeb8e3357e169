"""Assembling the model from options, rendering attributes, and loading a trained run.

The one place that turns an options namespace into networks and a template, so that training,
`test.py`, `show_rainbow2.py` and `demo.py` build exactly the same model from `opts.yaml`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from datasets import build_dataset
from networks import AttributeEncoder, Attributes, Discriminator, MultiScaleDiscriminator
from renderer.mesh import Template
from renderer.render import RenderOutput, render
from utils.checkpoints import load_newest
from utils.cli import RunError
from utils.options import derive, load_options


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} asked for, but PyTorch sees no CUDA device: use --device cpu")
    return device


def build_template(opts: argparse.Namespace) -> Template:
    """The initial template: the built-in icosphere, or `--template_path`, normalised per `--ellipsoid`."""
    if opts.template_path:
        path = Path(opts.template_path)
        if not path.is_file():
            raise FileNotFoundError(f"--template_path {path} does not exist; omit it to use the built-in icosphere")
        return Template.from_obj(path, ellipsoid=opts.ellipsoid)
    return Template.icosphere(ellipsoid=opts.ellipsoid)


def build_encoder(opts: argparse.Namespace, template: Template) -> AttributeEncoder:
    d = derive(opts)
    return AttributeEncoder(
        template_verts=template.verts,
        laplacian=template.laplacian,
        height=d.height,
        width=d.width,
        shape_backbone=opts.pretrains,
        camera_backbone=opts.pretrainc,
        texture_backbone=opts.pretraint,
        pretrained=opts.pretrained,
        norm=opts.norm,
        nk=opts.nk,
        coordconv=opts.coordconv,
        local_features=not opts.nolpl,
        predict_background=opts.bg,
        drop_camera=d.drop_camera,
        drop_shape=d.drop_shape,
        drop_texture=d.drop_texture,
        texture_scratch_blocks=d.texture_scratch_blocks,
        dist_range=d.dist_range,
        elev_range=d.elev_range,
        azi_scope=opts.azi_scope,
        separate_elevation_head=opts.separate_elevation_head,
    )


def build_critic(opts: argparse.Namespace) -> torch.nn.Module:
    channels = 4 if opts.unmask == 2 else 3
    return Discriminator(channels) if opts.gan_type == "wgan" else MultiScaleDiscriminator(channels)


def render_attributes(attrs: Attributes, template: Template, height: int, width: int,
                      with_background: bool = False) -> RenderOutput:
    """Render an attribute set; `with_background` composites over the predicted background
    (training with `--bg`), otherwise on white (evaluation, gifs)."""
    return render(
        attrs.verts, template.faces, template.face_uvs,
        attrs.azimuth_deg, attrs.elevation_deg, attrs.distance, attrs.offset,
        attrs.texture, attrs.light, height=height, width=width,
        background=attrs.background if with_background else None,
    )


def as_image(out: RenderOutput) -> torch.Tensor:
    """(B,4,H,W): rendered RGB + soft silhouette, the layout of the dataset images."""
    return torch.cat([out.rgb, out.silhouette], dim=1)


@dataclass
class TrainedRun:
    opts: argparse.Namespace
    template: Template
    encoder: AttributeEncoder
    epoch: int
    checkpoint_path: Path


def load_run(run_dir: Path, which: str = "best", device: str = "cpu", swa: bool = False) -> TrainedRun:
    """Rebuild a run's encoder (eval mode) and learned template from `opts.yaml` and a checkpoint.

    A run folder of the original code (its released models) is converted once on first use
    (`utils.released.run_folder`).

    Args:
        run_dir: log/<name>.
        which: 'best', 'latest', or a path to a checkpoint file; when that file is unreadable, its
            previous generation (`<stem>.prev.pt`) is used with a warning.
        swa: load the stochastic-weight-averaged encoder instead of the last one.
    Raises FileNotFoundError (never evaluates an untrained model), CheckpointError for unreadable or
    untrusted checkpoints and ValueError for a checkpoint without SWA weights when `swa` is asked for,
    or an original run folder that cannot be converted.
    """
    from utils.released import run_folder  # utils.released builds its encoders with this module

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} not found: check --name (runs live in log/<name>)")
    run_dir = run_folder(run_dir)
    opts = load_options(run_dir / "opts.yaml")
    path = Path(which) if which not in ("best", "latest") else run_dir / "ckpts" / f"{which}.pt"
    ckpt, path = load_newest(path)
    # The weights come from the checkpoint: never ask for ImageNet weights when rebuilding.
    opts.pretrained = False
    template = build_template(opts)
    encoder = build_encoder(opts, template)
    key = "swa_encoder" if swa else "encoder"
    if key not in ckpt:
        raise ValueError(f"{path} holds no SWA weights (SWA starts at epoch {derive(opts).swa_start}); drop --swa")
    encoder.load_state_dict(ckpt[key])
    template = replace(template, verts=encoder.template.detach().clone())
    encoder.to(device).eval()
    return TrainedRun(opts, template.to(device), encoder, ckpt["epoch"], path)


# ----------------------------------------------------------------------------- what test.py, show_rainbow2.py
# and demo.py share: which trained run to open, and its test split


def add_run_arguments(parser) -> None:
    """Add the flags that pick a trained run: --name, --log_root, --checkpoint, --swa, --device."""
    parser.add_argument("--name", required=True, help="run name; the run folder is <log_root>/<name>")
    parser.add_argument("--log_root", default="./log", help="folder that holds the run folders")
    parser.add_argument("--checkpoint", default="best",
                        help="'best', 'latest' (the run's ckpts/<which>.pt) or the path of a checkpoint file")
    parser.add_argument("--swa", action=argparse.BooleanOptionalAction, default=False,
                        help="use the stochastic-weight-averaged encoder of the checkpoint")
    parser.add_argument("--device", default="auto",
                        help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'")


def open_run(args):
    """The `TrainedRun` (encoder in eval mode, learned template) the run flags name; raises
    FileNotFoundError for an unknown run or a missing checkpoint."""
    return load_run(Path(args.log_root) / args.name, args.checkpoint, resolve_device(args.device), args.swa)


def evaluation_split(opts, dataroot: str | None = None):
    """The test split of a run's dataset, as the trainer evaluates it (no augmentation; ATR runs with
    --filter_test keep only the test images inside the foreground-ratio window).

    Args:
        opts: the run's options (`TrainedRun.opts`); dataroot: another dataset folder than the one
            stored in opts.yaml (the training machine's path).
    """
    return build_dataset(opts.dataset, root=dataroot or opts.dataroot, split="test",
                         image_size=opts.imageSize, ratio=opts.ratio, threshold=derive(opts).threshold,
                         aug=False, bg=opts.bg, filter_test=opts.filter_test)
