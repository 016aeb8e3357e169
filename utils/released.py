"""The original code's run folders (its released trained models), read through one converter.

A run folder of the original (``log/<run>/`` with ``opts.yaml``, ``ckpts/best_ckpt.pth`` and the
learned template ``ckpts/best_mesh.obj``) is detected by `run_folder` and converted once, on first
use, into ``log/<run>/converted/`` (our ``opts.yaml``, the template as ``template.obj`` and
``ckpts/best.pt``); the original files are only read. Nothing else in the code knows the original's
option or weight names. `RELEASED_RUNS` lists the models the original README links to.

What the conversion does (README: "Use the trained models" and "Differences from the original code"):

* options: the dataset comes from the run name as the original ``test.py`` picked it (``MKT`` ->
  Market, ``ATR2`` -> ATR with its filtered test split, ``ATR`` -> ATR, else CUB); the keys the
  original ``test.py`` reads from ``opts.yaml`` (`OPTION_KEYS`) are taken from it, every other
  option is the dataset script's default; the dataset folder is ours (``data/...``), not the
  training machine's;
* weights: every tensor of our encoder is taken from ``netE`` (``swa_modelE`` for ``--swa``) under
  its original name (`original_key`), shapes checked; every tensor of the original must be used,
  except the third texture BiFPN's ``up4`` conv, whose output the original's forward never uses
  (`UNUSED_ORIGINAL`); the template is the vertices of ``best_mesh.obj`` (the original kept it out
  of the state dict), with that file's faces and per-corner UVs;
* the checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain containers only.
  A file that needs more is refused, never unpickled.
"""

from __future__ import annotations

import argparse
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from datasets import DEFAULT_ROOTS
from renderer.mesh import load_obj, save_obj
from train import CUB_DEFAULTS
from train_ATR2 import ATR_DEFAULTS
from train_market import MARKET_DEFAULTS
from utils.checkpoints import save_checkpoint
from utils.model import build_encoder, build_template
from utils.options import BACKBONES, build_parser, derive, save_options

ORIGINAL_CHECKPOINT = Path("ckpts/best_ckpt.pth")
ORIGINAL_MESH = Path("ckpts/best_mesh.obj")
CONVERTED = "converted"
"""Sub-folder of an original run folder that holds the converted run."""


@dataclass(frozen=True)
class ReleasedRun:
    """A trained model the original README links to: its run folder name, Google Drive id, and the
    README's training command (its flags stand in for ``opts.yaml`` if the archive lacks one)."""

    name: str
    drive_id: str
    flags: tuple[str, ...]


RELEASED_RUNS = {
    "market": ReleasedRun(
        "CamN2_MKT_wgan_b48_lr0.5_em7_update-1_lpl_reg0.1_data2_m2_flat20_depthR0.15_drop220_gap2_beta0.95_clean67",
        "1-eqnnFt3D7-jUelJ5uj_4QcFv-TMok8c",
        ("--imageSize", "64", "--batchSize", "48", "--gan_type", "wgan", "--bg", "--L1", "--ganw", "0", "--hard",
         "--lr", "5e-5", "--em", "7", "--update_shape", "-1", "--lambda_data", "2", "--unmask", "2",
         "--lambda_flat", "0.02", "--lambda_depthR", "0.15", "--droprate", "0.2,0.2,0", "--beta1", "0.95",
         "--clean_threshold", "0.36,0.49", "--em_gap", "2", "--pretrainc", "none"),
    ),
    "cub": ReleasedRun(
        "CUB_wgan_b48_ic1_hard_bg_L1_ganW0_lr0.7_em7_update-1_chf_lpl_reg0.1_data2_depthC0.1_flat10_drop220_gap2_"
        "beta0.95_bn_restart1_contour0.1",
        "1urxUeaULn2DNM-4XAcZ2_OmtGJuCSeYO",
        ("--batchSize", "48", "--gan_type", "wgan", "--bg", "--L1", "--ganw", "0", "--hard", "--lr", "7e-5",
         "--em", "7", "--update_shape", "-1", "--lambda_data", "2", "--unmask", "2", "--lambda_flat", "0.01",
         "--lambda_depthC", "0.1", "--droprate", "0.2,0.2,0", "--beta1", "0.95", "--update_bn", "--gamma", "0.1",
         "--scheduler", "restart1", "--lambda_contour", "0.1", "--em_gap", "2"),
    ),
}

OPTION_KEYS = ("gan_type", "workers", "batchSize", "imageSize", "nk", "niter", "azi_scope", "bias_range",
               "elev_range", "dist_range", "bg", "coordconv", "pretrains", "pretrainc", "pretraint", "norm",
               "threshold", "droprate", "ratio", "ellipsoid", "nolpl", "unmask")
"""Options taken from the original's ``opts.yaml``: those its ``test.py`` reads, plus ``nolpl`` and
``unmask`` (they change the networks)."""

UNUSED_ORIGINAL = re.compile(r"^texture_enc\.bifpn\.bifpn3\.up4\.")
"""Tensors of the original that nothing in its forward uses (the last BiFPN returns before its
bottom-up pass); our decoder does not build them."""

_SCRIPT_DEFAULTS = {"cub": CUB_DEFAULTS, "market": MARKET_DEFAULTS, "atr": ATR_DEFAULTS}


def is_original_run(run_dir: Path) -> bool:
    """True for a run folder written by the original code (it has ``ckpts/best_ckpt.pth``)."""
    return (Path(run_dir) / ORIGINAL_CHECKPOINT).is_file()


def run_folder(run_dir: Path) -> Path:
    """The folder holding our ``opts.yaml`` and ``ckpts/`` for ``run_dir``: ``run_dir`` itself, or for
    a run folder of the original its converted copy, converted now if that was not done before."""
    run_dir = Path(run_dir)
    if not is_original_run(run_dir):
        return run_dir
    target = run_dir / CONVERTED
    if not (target / "ckpts" / "best.pt").is_file():
        convert_run(run_dir, target)
    return target


def dataset_from_name(name: str) -> tuple[str, bool]:
    """(dataset, filter_test) of an original run, from its name as the original ``test.py`` decided."""
    if "MKT" in name:
        return "market", False
    if "ATR2" in name:
        return "atr", True
    if "ATR" in name:
        return "atr", False
    return "cub", False


def original_options(run_dir: Path, template_path: Path) -> argparse.Namespace:
    """Our options for an original run folder (see the module docstring); ValueError for what we
    cannot rebuild (another template model, an unsupported backbone or norm)."""
    dataset, filter_test = dataset_from_name(run_dir.name)
    released = {r.name: r for r in RELEASED_RUNS.values()}.get(run_dir.name)
    path = run_dir / "opts.yaml"
    if path.is_file():
        stored = yaml.safe_load(path.read_text()) or {}
        flags: tuple[str, ...] = ()
    elif released is not None:
        stored, flags = {}, released.flags  # the README's command of this released run
    else:
        raise FileNotFoundError(f"{path} is missing: the original's test.py needs it too; copy the run's "
                                "opts.yaml from the machine that trained it")
    if stored.get("makeup", 0):
        raise ValueError(f"{path}: makeup={stored['makeup']} (texture refinement net) is not provided here")
    opts = build_parser(_SCRIPT_DEFAULTS[dataset]).parse_args(list(flags))
    for key in OPTION_KEYS:
        if key in stored:
            setattr(opts, key, stored[key])
    opts.ratio, opts.ellipsoid = float(opts.ratio), float(opts.ellipsoid)
    if "res" in str(opts.pretraint):
        opts.pretraint = "res34"  # the original built ResNet-34 for any res* texture backbone
    for flag in ("pretrains", "pretrainc", "pretraint"):
        if getattr(opts, flag) not in BACKBONES:
            raise ValueError(f"{path}: --{flag} {getattr(opts, flag)} is not provided here (choose from {BACKBONES})")
    if opts.pretraint == "none":
        raise ValueError(f"{path}: the original's from-scratch texture encoder (--pretraint none) is not provided")
    if opts.norm not in ("bn", "in", "none"):
        raise ValueError(f"{path}: --norm {opts.norm} is not provided here")
    opts.name, opts.log_root = run_dir.name, str(run_dir.parent)
    opts.dataset, opts.filter_test, opts.dataroot = dataset, filter_test, str(DEFAULT_ROOTS[dataset])
    opts.template_path, opts.pretrained = str(template_path), False
    derive(opts)
    return opts


def read_original_checkpoint(path: Path) -> dict:
    """Load an original ``best_ckpt.pth`` with ``weights_only=True``: tensors and plain containers only.

    Raises ValueError for a file that needs anything else (it is refused, not unpickled) or that is
    not a checkpoint of the original (no ``netE`` state dict).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1]
        raise ValueError(f"{path} holds more than tensors and plain containers ({reason}). It was not loaded: "
                         "unpickling it could run arbitrary code. The original's checkpoints hold only state "
                         "dicts; get a clean copy (python download_models.py).") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("netE"), dict):
        raise ValueError(f"{path} is not a checkpoint of the original code (no 'netE' state dict)")
    return ckpt


def read_original_mesh(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The learned template of an original run: verts (V, 3) float32, faces (F, 3) int64, face_uvs
    (F, 3, 2) float32.

    The original writes one ``vt`` line per face corner and faces without UV indices; faces with
    UV indices are read as such.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} (the learned template) is missing: the original's run folder is incomplete")
    verts, faces, face_uvs = load_obj(path)
    if face_uvs is None:
        texcoords = [line.split()[1:3] for line in path.read_text().splitlines() if line.startswith("vt ")]
        if len(texcoords) != 3 * len(faces):
            raise ValueError(f"{path} has {len(texcoords)} texture coordinates for {len(faces)} faces; expected one "
                             "per face corner, as the original writes them")
        face_uvs = torch.tensor([[float(u), float(v)] for u, v in texcoords]).view(-1, 3, 2)
    return verts, faces, face_uvs


_BIFPN_PARTS = {"top5": "up1.0", "top4": "up2.0", "top3": "up3.0", "lateral2": "up4.0",
                "down2": "down1.0", "down3": "down2.0", "down4": "down3.0"}
_PREFIXES = (  # (our prefix, original prefix, original blocks are named like ours up to the block rules)
    ("camera_encoder.backbone.layer5.", "camera_enc.encoder1.layer5.0."),
    ("camera_encoder.backbone.", "camera_enc.encoder1."),
    ("camera_encoder.global_pool.", "camera_enc.avgpool1."),
    ("camera_encoder.local_pool.", "camera_enc.avgpool2."),
    ("camera_encoder.dist_elev_head.", "camera_enc.linear1."),
    ("camera_encoder.azimuth_head.", "camera_enc.linear2."),
    ("camera_encoder.offset_head.", "camera_enc.linear3."),
    ("shape_encoder.backbone.attention.gate.", "shape_enc.encoder1.ca."),
    ("shape_encoder.backbone.layer5.", "shape_enc.encoder1.layer5.0."),
    ("shape_encoder.backbone.", "shape_enc.encoder1."),
    ("shape_encoder.global_pool.", "shape_enc.mmpool."),
    ("shape_encoder.point_mlp.", "shape_enc.encoder2."),
    ("shape_encoder.output.", "shape_enc.linear3."),
    ("shape_encoder.global_norm.", "shape_enc.bn."),
    ("texture_encoder.decoder.up_half.", "texture_enc.bifpn.up5."),
    ("texture_encoder.decoder.up_full.", "texture_enc.bifpn.up5a."),
    ("texture_encoder.decoder.head.", "texture_enc.bifpn.up6."),
    ("light_encoder.features.", "light_enc.encoder1."),
    ("light_encoder.head.3.", "light_enc.linear3."),
    ("light_encoder.head.", "light_enc.encoder2."),
    ("background_encoder.net.", "bg_enc.encoder."),
)
_FOREIGN = (  # library backbones (timm HRNet, torchvision ResNet): their own names, kept as they are
    ("shape_encoder.backbone.net.", "shape_enc.encoder1.model."),
    ("texture_encoder.backbone.stem.", "texture_enc.block1."),
    ("texture_encoder.backbone.layer1.", "texture_enc.block2."),
    ("texture_encoder.backbone.layer2.", "texture_enc.block3."),
    ("texture_encoder.backbone.layer3.", "texture_enc.block4."),
    ("texture_encoder.backbone.layer4.", "texture_enc.block5."),
)


def original_key(key: str, drop_shape: float) -> str:
    """The name in the original's ``netE`` state dict of our encoder's tensor ``key``.

    Args:
        key: a key of `networks.AttributeEncoder`'s state dict (not ``template``).
        drop_shape: the shape encoder's dropout; without it the original's point-wise MLP has no
            Dropout module, so its later layers sit one index lower.
    """
    for ours, theirs in _FOREIGN:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    if key.startswith("texture_encoder.decoder.fuse."):
        index, part, rest = key[len("texture_encoder.decoder.fuse."):].split(".", 2)
        key = f"texture_enc.bifpn.bifpn{int(index) + 1}.{_BIFPN_PARTS[part]}.{rest}"
    else:
        for ours, theirs in _PREFIXES:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        else:
            raise ValueError(f"no counterpart in the original's netE for {key}")
    if key.startswith("shape_enc.encoder2.") and drop_shape == 0:
        index, rest = key[len("shape_enc.encoder2."):].split(".", 1)
        key = f"shape_enc.encoder2.{int(index) - 1 if int(index) > 3 else index}.{rest}"
    key = re.sub(r"\.branches\.(\d)\.", lambda m: f".conv{int(m.group(1)) + 1}.", key)  # ASPP
    key = re.sub(r"\.blocks\.(\d+)\.body\.", r".model.\1.model.", key)  # ResBlocks of ResBlock
    return key.replace(".body.", ".model.").replace(".attention.gate.", ".ca.")


def convert_state_dict(original: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], template: torch.Tensor,
                       drop_shape: float, source: str) -> dict[str, torch.Tensor]:
    """Our encoder state dict from the original's ``netE`` one (complete and strict).

    Args:
        original: the original's state dict.
        expected: our encoder's state dict (names and shapes wanted).
        template: (V, 3) learned template, our ``template`` buffer.
        drop_shape: the shape encoder's dropout (see `original_key`).
        source: the file, for error messages.
    Raises ValueError naming every original key that is missing, left over (other than
    `UNUSED_ORIGINAL`) or of the wrong shape.
    """
    state, used, missing, wrong = {}, set(), [], []
    for key, want in expected.items():
        value = template if key == "template" else None
        name = "best_mesh.obj vertices" if key == "template" else original_key(key, drop_shape)
        if value is None:
            if name not in original:
                missing.append(name)
                continue
            value = original[name]
            used.add(name)
        if tuple(value.shape) != tuple(want.shape):
            wrong.append(f"{name} {tuple(value.shape)} (expected {tuple(want.shape)} for {key})")
            continue
        state[key] = value.to(want.dtype)
    extra = sorted(k for k in original if k not in used and not UNUSED_ORIGINAL.match(k))
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for what, keys in (("missing", missing), ("not used by this model", extra),
                                   ("wrong shape", wrong)) if keys]
    if problems:
        raise ValueError(f"{source} does not fit the model its opts.yaml describes: " + "; ".join(problems))
    return state


def convert_run(run_dir: Path, target: Path) -> None:
    """Convert an original run folder into ``target`` (``opts.yaml``, ``template.obj``, ``ckpts/best.pt``
    written last, so a conversion stopped half-way is redone); the original files are only read."""
    opts = original_options(run_dir, target / "template.obj")
    ckpt = read_original_checkpoint(run_dir / ORIGINAL_CHECKPOINT)
    verts, faces, face_uvs = read_original_mesh(run_dir / ORIGINAL_MESH)
    target.mkdir(parents=True, exist_ok=True)
    save_obj(target / "template.obj", verts, faces, face_uvs)
    encoder = build_encoder(opts, build_template(opts))
    expected, drop_shape = encoder.state_dict(), derive(opts).drop_shape
    source = str(run_dir / ORIGINAL_CHECKPOINT)
    out = {"epoch": int(ckpt.get("epoch", -1)), "converted_from": source,
           "encoder": convert_state_dict(ckpt["netE"], expected, verts, drop_shape, f"{source} (netE)")}
    if "swa_modelE" in ckpt:  # an AveragedModel: the encoder under "module.", plus its average count
        swa = {k[len("module."):]: v for k, v in ckpt["swa_modelE"].items() if k.startswith("module.")}
        out["swa_encoder"] = convert_state_dict(swa, expected, verts, drop_shape, f"{source} (swa_modelE)")
    save_options(opts, target / "opts.yaml")
    save_checkpoint(out, target / "ckpts" / "best.pt")
    print(f"converted the original's run folder {run_dir} into {target} (done once; the original files are "
          "unchanged)")
