"""The one flag schema shared by `train.py`, `train_market.py` and `train_ATR2.py`.

Each training script only changes defaults (`parse_options(argv, script_defaults)`); the flag names
are the original code's, so its README commands keep working, including the abbreviations they rely
on (`--batch` -> `--batchSize`, `--drop` -> `--droprate`, `--clean` -> `--clean_threshold`).

Rules:
- every boolean can be switched both ways (`--bg` / `--no-bg`);
- no value is rewritten after parsing: quantities derived from several flags (image height, the
  parsed ranges, the SWA start, ...) are computed once by `derive(opts)`;
- `--dataset synthetic` selects the embedded synthetic dataset, and with it a small, CPU-friendly
  preset of defaults (`SYNTHETIC_PRESET`); `--dataset birds` the generated bird dataset and a
  GPU-sized preset (`BIRDS_PRESET`); flags given on the command line still win.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from datasets import CROP_DATASETS
from networks.encoders import check_image_size
from utils.cli import ArgumentParser

DATASETS = ("cub", "market", "atr", "synthetic", "birds")
BACKBONES = ("none", "res18", "res34", "res50", "hr18sv2")
SCHEDULERS = ("cosine", "step", "restart", "restart2", "restart1", "exp")

# What both generated datasets' presets set: from-scratch backbones (no ImageNet weights needed) and
# every image kept (their masks are never empty or full).
_GENERATED_DATA = dict(pretrains="none", pretrainc="none", pretraint="none", threshold="0.01,0.99",
                       clean_threshold="0.01,0.99")

# Defaults a `--dataset synthetic` run uses unless the command line says otherwise: small images,
# from-scratch backbones and a short schedule, so the quick start trains on a CPU in minutes.
SYNTHETIC_PRESET = dict(
    dataroot="./data/synthetic",
    imageSize=64,
    batchSize=16,
    niter=6,
    warm_epoch=1,
    eval_every=2,
    em_gap=2,
    **_GENERATED_DATA,
    # The object stays in the frame at 3 and is still ~12 px tall at 6 (64-px images).
    dist_range="3~6",
    workers=2,
    synthetic_train=192,
    synthetic_test=48,
)

# Defaults of a `--dataset birds` run: CUB's image size and camera ranges, from-scratch backbones
# (no ImageNet weights are needed) and a schedule sized for about half an hour on one GPU.
BIRDS_PRESET = dict(
    dataroot="./data/birds",
    imageSize=128,
    batchSize=32,
    niter=200,
    warm_epoch=20,
    eval_every=20,
    vis_every=20,
    **_GENERATED_DATA,
    synthetic_train=2048,
    synthetic_test=256,
)
PRESETS = {"synthetic": SYNTHETIC_PRESET, "birds": BIRDS_PRESET}
"""The generated datasets' defaults, applied on top of the script's."""


def _range(text: str, sep: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.replace(" ", "").split(sep))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'min{sep}max', got {text!r}") from None
    if lo > hi:
        raise argparse.ArgumentTypeError(f"range {text!r} has min > max")
    return lo, hi


def build_parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    """The full schema; `defaults` (flag dest -> value) overrides the generic defaults below."""
    p = ArgumentParser(
        description="Train 3D Magic Mirror: single-image textured mesh, camera and light, learned by "
        "re-rendering. Everything a run writes goes to log/<name>/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bool_flag = dict(action=argparse.BooleanOptionalAction)

    g = p.add_argument_group("run")
    g.add_argument("--name", default="baseline", help="run name; the run folder is log/<name>")
    g.add_argument("--log_root", default="./log", help="folder that holds the run folders")
    g.add_argument("--resume", **bool_flag, default=False,
                   help="continue log/<name> from ckpts/latest.pt (or, if that is unreadable, the previous "
                   "generation latest.prev.pt) exactly where it stopped; refused when there is no checkpoint")
    g.add_argument("--auto_resume", **bool_flag, default=False,
                   help="resume log/<name> if it holds a checkpoint, else start it: the one command for a job "
                   "that a cluster may kill and requeue (README: Reliability)")
    g.add_argument("--save_every_min", type=float, default=20.0,
                   help="also write ckpts/latest.pt inside an epoch when this many minutes have passed since "
                   "the last checkpoint, so a hard kill loses at most this much training; 0: only at epoch ends")
    g.add_argument("--manualSeed", type=int, default=0, help="seed of every random generator")
    g.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'")
    g.add_argument("--eval_every", type=int, default=20,
                   help="evaluate on the test split (mask IoU, SSIM) every this many epochs, and at the end")
    g.add_argument("--vis_every", type=int, default=10, help="write image grids and meshes every this many epochs")
    g.add_argument("--sync_bn", **bool_flag, default=False,
                   help="with torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm) "
                   "instead of per process")
    g.add_argument("--cudnn_benchmark", **bool_flag, default=True,
                   help="let cuDNN time its convolution algorithms on each new input shape and keep the fastest, "
                   "as the original did (README: training speed); with --no-cudnn_benchmark cuDNN's heuristic "
                   "picks them, the same in every run")
    g.add_argument("--channels_last", **bool_flag, default=None,
                   help="keep images, activations and convolution weights in channels-last (NHWC) memory "
                   "layout, the one cuDNN's fast kernels use, instead of converting inside every convolution "
                   "(README: training speed); the same model and checkpoints, results equal up to rounding. "
                   "Default: on for a CUDA device, off on the CPU")
    g.add_argument("--amp", **bool_flag, default=False,
                   help="run the encoders and the critic under bfloat16 autocast (convolutions and matrix products "
                   "in bf16; renderer, losses and optimizer in float32): faster on GPUs, results differ by rounding "
                   "(README: training speed)")
    g.add_argument("--tf32", **bool_flag, default=False,
                   help="let float32 matrix products (linear layers, matmul) use TF32 tensor cores, as cuDNN's "
                   "convolutions already do: faster on GPUs, results differ by rounding (README: training speed)")
    g.add_argument("--cuda_graphs", **bool_flag, default=True,
                   help="on a single CUDA device, capture the training step as CUDA graphs (one per encoder freeze "
                   "mode, after 3 eager steps each) and replay them: one launch instead of ~9,000 per step, the same "
                   "kernels and random numbers (README: training speed). Ignored on the CPU and under torchrun")
    g.add_argument("--concurrent_encoders", **bool_flag, default=True,
                   help="on a single CUDA device, run the five sub-encoders (camera, shape, texture, light, "
                   "background) side by side on their own CUDA streams, forward and backward: the same "
                   "computation, their small kernels overlap (README: training speed). Ignored on the CPU and "
                   "under torchrun")
    g.add_argument("--max_bad_steps", type=int, default=5,
                   help="stop with an error after this many consecutive steps skipped for a non-finite loss or "
                   "gradient")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="cub", help="which dataset loader to use")
    g.add_argument("--dataroot", default="./data/CUB_Data", help="dataset root folder")
    g.add_argument("--imageSize", type=int, default=128, help="image width W in pixels")
    g.add_argument("--ratio", type=float, default=1.0, help="image height / width; H = round(ratio * W)")
    g.add_argument("--batchSize", type=int, default=32,
                   help="images per step and process: with torchrun the global batch is this x the process count")
    g.add_argument("--workers", type=int, default=4, help="data-loader worker processes")
    g.add_argument("--prefetch_factor", type=int, default=3, help="batches each worker loads ahead")
    g.add_argument("--threshold", default="0.16,0.64",
                   help="foreground-ratio window 'lo,hi' (exclusive) of the training images")
    g.add_argument("--clean_threshold", default="0.25,0.49",
                   help="foreground-ratio window 'lo,hi' of the images the template update averages")
    g.add_argument("--bg", **bool_flag, default=False,
                   help="keep the real background in the input and predict a background image")
    g.add_argument("--original_crop", **bool_flag, default=None,
                   help="CUB/ATR/synthetic random crop as the original drew it (right/lower edges drawn "
                   "independently: aspect and scale jitter), the default for those datasets; --no-original_crop: "
                   "a fixed-size 95-99%% crop. Market (shifted, not cropped) refuses --original_crop")
    g.add_argument("--train_repeats", type=int, default=None,
                   help="visits of each training image per epoch (an epoch is then that many passes: warm-up, "
                   "template updates and the LR schedule count epochs); default: the dataset's, 2 for CUB and "
                   "birds (the original's CUB loader), 1 for the others")
    g.add_argument("--filter_test", **bool_flag, default=False,
                   help="ATR: filter the test split by --threshold too, as the original ATR2 did (1,647 of 1,706)")
    g.add_argument("--synthetic_train", type=int, default=2048,
                   help="generated datasets (synthetic, birds): training images")
    g.add_argument("--synthetic_test", type=int, default=256, help="generated datasets (synthetic, birds): test images")
    g.add_argument("--data_seed", type=int, default=0,
                   help="generated datasets (synthetic, birds): seed of the data, independent of --manualSeed so that "
                   "runs of several seeds train and test on the same images")
    g.add_argument("--birds_spp", type=int, default=16,
                   help="birds dataset: path-tracing samples per pixel of its renders (fewer: faster, noisier)")

    g = p.add_argument_group("model")
    g.add_argument("--template_path", default=None,
                   help="template .obj; default: the built-in 642-vertex icosphere")
    g.add_argument("--ellipsoid", type=float, default=1.0,
                   help="template squash: z/2 unless -1; x and z further divided by this value unless 1")
    g.add_argument("--pretrains", choices=BACKBONES, default="hr18sv2", help="shape-encoder backbone")
    g.add_argument("--pretrainc", choices=BACKBONES, default="none", help="camera-encoder backbone")
    g.add_argument("--pretraint", choices=BACKBONES, default="res34", help="texture-encoder backbone")
    g.add_argument("--pretrained", **bool_flag, default=True,
                   help="initialise ResNet/HRNet backbones with ImageNet weights (needs them locally)")
    g.add_argument("--norm", choices=("bn", "in", "none"), default="bn", help="normalisation of conv blocks")
    g.add_argument("--nk", type=int, default=5, help="kernel size of the first camera conv and the light convs")
    g.add_argument("--texture_scratch_blocks", default="1,3,3,2",
                   help="ResBlocks in each of the four stages (strides 4/8/16/32) of the from-scratch texture "
                   "backbone (--pretraint none); the original's trunk has 1,3,3,2")
    g.add_argument("--droprate", default="0.2,0.2,0.2",
                   help="dropout 'camera&light,shape,texture&background'")
    g.add_argument("--coordconv", **bool_flag, default=True, help="append coordinate channels before selected convs")
    g.add_argument("--nolpl", **bool_flag, default=False,
                   help="ablation: no template-local features in the camera and shape encoders")
    g.add_argument("--separate_elevation_head", **bool_flag, default=False,
                   help="predict the camera elevation with a head of its own instead of the distance head's "
                   "second output (the original's shared head); README: the birds' elevation")
    g.add_argument("--gan_type", choices=("wgan", "lsgan"), default="wgan",
                   help="wgan: single critic with gradient penalty; lsgan: multi-scale least squares")
    g.add_argument("--unmask", type=int, choices=(0, 1, 2), default=0,
                   help="critic input: 0 RGB on white by the mask, 1 RGB only, 2 RGB + mask")

    g = p.add_argument_group("camera ranges")
    g.add_argument("--azi_scope", type=float, default=360.0, help="azimuth range in degrees")
    g.add_argument("--elev_range", default="0~30", help="elevation range in degrees, 'min~max'")
    g.add_argument("--dist_range", default="2~7", help="camera distance range, 'min~max'")
    g.add_argument("--bias_range", type=float, default=0.3,
                   help="random look-at offsets of the novel views are drawn from [-x, x]^2")
    g.add_argument("--hard", **bool_flag, default=False,
                   help="show the critic the reconstruction re-rendered from a random azimuth")
    g.add_argument("--hard_range", type=int, default=0,
                   help="half of the random azimuths of --hard are drawn from [x, 180-x] degrees")

    g = p.add_argument_group("optimisation")
    g.add_argument("--niter", type=int, default=600, help="number of epochs")
    g.add_argument("--lr", type=float, default=1e-4, help="base learning rate")
    g.add_argument("--lr_shape_backbone", type=float, default=0.05,
                   help="learning rate of the shape encoder's backbone, as a fraction of --lr; the original "
                   "used 0.05 whether the backbone was pretrained or trained from scratch (1: one rate for all)")
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (beta2 = 0.999)")
    g.add_argument("--wd", type=float, default=0.0, help="weight decay")
    g.add_argument("--amsgrad", **bool_flag, default=True, help="AMSGrad variant of Adam")
    g.add_argument("--adamw", **bool_flag, default=False, help="AdamW instead of Adam for the encoders")
    g.add_argument("--scheduler", choices=SCHEDULERS, default="cosine", help="per-epoch learning-rate schedule")
    g.add_argument("--gamma", type=float, default=0.01,
                   help="cosine schedules: eta_min = gamma * lr; step: the decay factor")
    g.add_argument("--warm_epoch", type=int, default=40, help="epochs of the linear loss warm-up (0.01 -> 1)")
    g.add_argument("--update_shape", type=int, default=1,
                   help="encoder alternation: -1 cycles shape / texture+light / camera; 0 trains all; "
                   "k>0 freezes the shape encoder except every k-th step, when the camera is frozen (so k = 1, the "
                   "default, trains the camera only through the attribute-cycle loss)")
    g.add_argument("--swa", **bool_flag, default=True, help="stochastic weight averaging of the encoders")
    g.add_argument("--swa_start", type=int, default=None,
                   help="first SWA epoch; default max(niter - 100, niter // 2)")
    g.add_argument("--swa_interval", type=int, default=1, help="average every this many epochs")

    g = p.add_argument_group("template update (EM)")
    g.add_argument("--em", type=float, default=1.0,
                   help="0: fixed template; >0: move it toward the mean predicted offset; "
                   ">=6: int(em-5) extra smoothing passes")
    g.add_argument("--em_gap", type=int, default=1, help="update the template every this many epochs")
    g.add_argument("--em_step", type=float, default=0.1, help="initial template step, x0.99 after each update")
    g.add_argument("--smooth", type=float, default=0.5, help="Laplacian smoothing step of the averaged offset")
    g.add_argument("--clip", type=float, default=0.05, help="per-coordinate clip of the averaged offset")
    g.add_argument("--white", **bool_flag, default=True, help="centre meshes and the template (zero mean)")
    g.add_argument("--cross", **bool_flag, default=False,
                   help="reject a template update that flips the z sign of any vertex")
    g.add_argument("--update_bn", **bool_flag, default=False,
                   help="re-estimate the encoders' BatchNorm statistics after each template update")
    g.add_argument("--update_bn_images", type=int, default=0,
                   help="with --update_bn: re-estimate from this many training images (whole batches of a "
                   "shuffled pass, at least one) instead of the whole training set, which the original passes "
                   "(twice per epoch on CUB); 0: the whole set")

    g = p.add_argument_group("loss weights")
    g.add_argument("--lambda_data", type=float, default=1.0, help="image L1 + soft-mask IoU")
    g.add_argument("--image_weight", type=float, default=1.0, help="weight of the RGB L1 inside the data loss")
    g.add_argument("--lambda_contour", type=float, default=0.0, help="silhouette-contour term inside the data loss")
    g.add_argument("--lambda_reg", type=float, default=0.1, help="multiplies Laplacian + flatness")
    g.add_argument("--lambda_lpl", type=float, default=0.1, help="Laplacian weight inside lambda_reg")
    g.add_argument("--lambda_flat", type=float, default=0.001, help="flatness weight inside lambda_reg")
    g.add_argument("--lambda_edge", type=float, default=0.001, help="edge-length uniformity")
    g.add_argument("--lambda_deform", type=float, default=0.1, help="mean offset norm")
    g.add_argument("--lambda_depth", type=float, default=0.0, help="plain z^2 depth regulariser")
    g.add_argument("--lambda_depthR", type=float, default=0.0, help="exponentially weighted depth regulariser")
    g.add_argument("--lambda_depthC", type=float, default=0.0, help="quadratically weighted depth regulariser")
    g.add_argument("--temp", type=float, default=2.0, help="temperature of the depthR weight")
    g.add_argument("--lambda_flipz", type=float, default=0.1, help="front/back (z-mirror) symmetry of offsets")
    g.add_argument("--flipL1", **bool_flag, default=False,
                   help="symmetry loss per coordinate (L1) instead of per-vertex Euclidean")
    g.add_argument("--lambda_ic", type=float, default=1.0, help="attribute-cycle loss on re-encoded novel views")
    g.add_argument("--lambda_spread", type=float, default=0.0,
                   help="azimuth-spread prior on the predicted cameras of each batch (not in the original): "
                   "keeps the camera from collapsing onto one view when the data's azimuths cover the circle; "
                   "acts in the steps that train the camera encoder (see --update_shape)")
    g.add_argument("--azim", type=float, default=1.0, help="azimuth weight inside the attribute-cycle camera loss")
    g.add_argument("--L1", **bool_flag, default=False, help="attribute-cycle loss in L1 (else squared error)")
    g.add_argument("--chamfer", **bool_flag, default=True,
                   help="attribute-cycle shape term is the Chamfer distance (else per-vertex L1/L2)")
    g.add_argument("--lambda_gan", type=float, default=1e-4, help="adversarial weight (critic and encoders)")
    g.add_argument("--ganw", type=float, default=1.0,
                   help="weight of interpolated renders relative to --hard renders in the GAN terms")
    g.add_argument("--gan_reg", type=float, default=10.0, help="gradient-penalty weight")

    if defaults:
        unknown = set(defaults) - {a.dest for a in p._actions}
        if unknown:
            raise ValueError(f"unknown option defaults: {sorted(unknown)}")
        p.set_defaults(**defaults)
    return p


def parse_options(argv: list[str] | None, script_defaults: dict) -> argparse.Namespace:
    """Parse a training command line on top of a script's defaults (and a generated dataset's preset)."""
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--dataset", choices=DATASETS, default=script_defaults.get("dataset", "cub"))
    known, _ = pre.parse_known_args(argv)
    defaults = dict(script_defaults)
    defaults.update(PRESETS.get(known.dataset, {}))
    opts = build_parser(defaults).parse_args(argv)
    derive(opts)  # validates early: a bad range fails before anything is written
    return opts


@dataclass(frozen=True)
class Derived:
    """Quantities computed from several flags, in one place."""

    height: int
    width: int
    elev_range: tuple[float, float]
    dist_range: tuple[float, float]
    threshold: tuple[float, float]
    clean_threshold: tuple[float, float]
    drop_camera: float
    drop_shape: float
    drop_texture: float
    texture_scratch_blocks: tuple[int, int, int, int]
    original_crop: bool
    swa_start: int
    run_dir: Path


def derive(opts: argparse.Namespace) -> Derived:
    """Check the options and compute the derived values; raises ValueError with what to fix."""
    try:
        drops = [float(v) for v in opts.droprate.split(",")]
    except ValueError:
        drops = []
    if len(drops) != 3:
        raise ValueError(f"--droprate expects three comma-separated floats, got {opts.droprate!r}")
    try:
        blocks = tuple(int(v) for v in opts.texture_scratch_blocks.split(","))
    except ValueError:
        blocks = ()
    if len(blocks) != 4 or min(blocks) < 1:
        raise ValueError("--texture_scratch_blocks expects four comma-separated counts >= 1, got "
                         f"{opts.texture_scratch_blocks!r}")
    if opts.train_repeats is not None and opts.train_repeats < 1:
        raise ValueError("--train_repeats must be >= 1")
    if opts.ratio <= 0:
        raise ValueError("--ratio must be > 0")
    if opts.original_crop and opts.dataset not in CROP_DATASETS:
        raise ValueError(f"--original_crop applies to the {', '.join(CROP_DATASETS)} datasets; {opts.dataset}'s "
                         "augmentation is a shift, not a crop: drop the flag")
    if opts.lr_shape_backbone < 0:
        raise ValueError("--lr_shape_backbone is a fraction of --lr and must be >= 0")
    if opts.save_every_min < 0:
        raise ValueError("--save_every_min must be >= 0 (0: checkpoints only at epoch ends)")
    if opts.update_bn_images < 0:
        raise ValueError("--update_bn_images must be >= 0 (0: the whole training set)")
    check_image_size(round(opts.ratio * opts.imageSize), opts.imageSize)
    try:
        elev = _range(opts.elev_range, "~")
        dist = _range(opts.dist_range, "~")
        thr = _range(opts.threshold, ",")
        clean = _range(opts.clean_threshold, ",")
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"bad range option: {err}") from None
    if dist[0] <= 1.0:
        raise ValueError("--dist_range must stay above 1 (the camera would enter the mesh)")
    swa_start = opts.swa_start if opts.swa_start is not None else max(opts.niter - 100, opts.niter // 2)
    return Derived(
        height=round(opts.ratio * opts.imageSize),
        width=opts.imageSize,
        elev_range=elev,
        dist_range=dist,
        threshold=thr,
        clean_threshold=clean,
        drop_camera=drops[0],
        drop_shape=drops[1],
        drop_texture=drops[2],
        texture_scratch_blocks=blocks,
        original_crop=opts.original_crop if opts.original_crop is not None else opts.dataset in CROP_DATASETS,
        swa_start=swa_start,
        run_dir=Path(opts.log_root) / opts.name,
    )


def _with_former_values(stored: dict) -> dict:
    """A run's saved options plus, for options its opts.yaml predates, the value such a run used where
    that differs from today's default: the from-scratch texture trunk had one block per stage. A run
    with another texture backbone did not build that trunk, so today's default is the same run."""
    former = {"texture_scratch_blocks": "1,1,1,1"} if stored.get("pretraint") == "none" else {}
    return {**former, **stored}

RUNTIME_OPTIONS = frozenset({
    "name", "log_root", "resume", "auto_resume", "debug", "device", "dataroot", "workers", "prefetch_factor",
    "eval_every", "vis_every", "save_every_min", "max_bad_steps", "cudnn_benchmark", "channels_last", "cuda_graphs",
    "concurrent_encoders",
    "niter",
})
"""Options that may differ between the attempts of one run: where and how it runs, and `--niter` (a run
may be extended; its schedulers keep the state they were checkpointed with)."""


def save_options(opts: argparse.Namespace, path: Path) -> None:
    """Write the options as YAML (what test.py / show_rainbow2.py / demo.py rebuild the model from).

    Atomic (temporary file + rename): a run killed while writing never leaves a torn opts.yaml."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(vars(opts), sort_keys=True))
    os.replace(tmp, path)


def check_same_options(opts: argparse.Namespace, path: Path) -> None:
    """Raise ValueError naming every option (outside `RUNTIME_OPTIONS`) whose value differs from the
    run's saved `path` (opts.yaml); options the file predates are not compared, except those
    `_with_former_values` fills in (with the value such a run used)."""
    stored = _with_former_values(_read_yaml(path))
    current = vars(opts)
    differ = sorted(k for k in stored.keys() & current.keys() - RUNTIME_OPTIONS if stored[k] != current[k])
    if differ:
        changes = ", ".join(f"--{k} {stored[k]!r} (now {current[k]!r})" for k in differ)
        raise ValueError(f"{path.parent} was started with other options: {changes}. Repeat its options to "
                         "continue it (only where and how it runs may change), or choose another --name")


def _read_yaml(path: Path) -> dict:
    try:
        stored = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({err}); fix or remove it") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{path} does not hold a mapping of options; fix or remove it")
    return stored


def load_options(path: Path) -> argparse.Namespace:
    """Read a run's opts.yaml back, filling flags added since it was written with the value such runs used
    (`_with_former_values`) or else today's default."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is the run name right? Runs live in log/<name>/opts.yaml")
    stored = _with_former_values(_read_yaml(path))
    opts = build_parser().parse_args([])
    known = vars(opts)
    unknown = set(stored) - set(known)
    if unknown:
        raise ValueError(f"{path} has options this version does not know: {sorted(unknown)}")
    known.update(stored)
    return opts
