"""Evaluation metrics: mask IoU, SSIM, FID, 3-D accuracy on synthetic data, parameters and FLOPs.

Conventions (data-eval-vis.md §3.1-§3.3, with the deliberate differences listed in the README):
- mask IoU: soft IoU of the rendered DIB-R silhouette against the ground-truth mask, per image,
  averaged (Kaolin's `1 - mask_iou`); computed on tensors, not on JPEG round trips unless asked.
- SSIM: `pytorch_msssim.ssim` (data_range 1, 11x11 Gaussian window) between the whitened input and
  the render on white, per image, averaged; optionally also after a 2x bicubic upscale (the original
  test.py does that for CUB).
- FID: pool3 features (2048-d) of the TF-FID Inception-v3 (pytorch-fid's weights, read from a local
  file), Frechet distance of their Gaussians (mean, unbiased covariance). Three of them: the
  reconstructions, renders at random azimuths (2 per image: a and a + 90) and at the predicted
  azimuth +-90 (2 per image), each against the whitened inputs.
- 3-D (synthetic data, which has ground truth): Chamfer distance between the predicted and the
  ground-truth mesh vertices, both centred at the origin (the object frame the renderer uses; the
  squared-distance, mean-both-ways convention of the training loss), and camera errors. Training
  fixes the object frame only up to a turn about the vertical axis (nothing tells the model where
  the ground truth's front is), so the metrics are also given after the one turn about y, shared by
  the whole split, that best aligns the predicted frame with the ground truth's (`frame_alignment`).
- FLOPs: PyTorch's own counter (`torch.utils.flop_counter`), where a multiply-add counts as 2 FLOPs.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_msssim import ssim as _ssim
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.inception import (
    BasicConv2d,
    Inception3,
    InceptionA,
    InceptionAux,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from tqdm import tqdm

from networks.losses import chamfer_distance
from renderer.shading import mask_iou
from utils.model import render_attributes

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
"""The pytorch-fid release file `--inception` expects (torchvision Inception-v3 layout, 1008 classes)."""
FID_SETS = ("recon", "rotation", "rotation90")
"""The rendered image sets compared with the inputs (result keys `fid_<set>`)."""


def whiten(images: torch.Tensor) -> torch.Tensor:
    """(B,4,H,W) RGB + mask -> (B,3,H,W) RGB composited on white by the mask."""
    rgb, mask = images[:, :3], images[:, 3:]
    return rgb * mask + (1 - mask)


def ssim(pred: torch.Tensor, target: torch.Tensor, upscale: int = 1) -> torch.Tensor:
    """Per-image SSIM of (B,3,H,W) images in [0,1] -> (B,); `upscale` > 1 resizes bicubically first.

    The upscale uses the antialiased bicubic kernel (a = -0.5), Pillow's, which the original used.
    """
    if upscale > 1:
        size = (pred.shape[-2] * upscale, pred.shape[-1] * upscale)
        pred, target = (F.interpolate(v, size=size, mode="bicubic", antialias=True).clamp(0, 1)
                        for v in (pred, target))
    return _ssim(pred, target, data_range=1.0, size_average=False)


def jpeg_round_trip(images: torch.Tensor) -> torch.Tensor:
    """Encode each (C,H,W) image in [0,1] as a quality-100 JPEG and decode it (the original's files)."""
    out = []
    for img in images.detach().cpu():
        buf = io.BytesIO()
        to_pil_image(img).save(buf, format="JPEG", quality=100)
        buf.seek(0)
        out.append(pil_to_tensor(Image.open(buf)).float() / 255)
    return torch.stack(out).to(images.device)


def wrap_degrees(angle: torch.Tensor) -> torch.Tensor:
    """Map angles in degrees to [-180, 180)."""
    return torch.remainder(angle + 180.0, 360.0) - 180.0


def azimuth_error(pred_deg: torch.Tensor, true_deg: torch.Tensor, mirror: bool = False) -> torch.Tensor:
    """Absolute azimuth error in degrees, (B,). With `mirror`, the front/back mirror image of the
    prediction (azimuth a -> 180 - a, the view through the z = 0 plane) counts as correct too: a
    front/back-symmetric object seen from 180 - a gives the left-right flipped image of the view from
    a, which a single silhouette hardly tells apart."""
    err = wrap_degrees(pred_deg - true_deg).abs()
    if mirror:
        err = torch.minimum(err, wrap_degrees(180.0 - pred_deg - true_deg).abs())
    return err


def surface_radius(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(B,) root-mean-square distance of the surfaces of meshes (B,V,3) with faces (F,3) from their
    centroids, every point of the surface weighted alike (exact: a triangle with corners a, b, c and
    area A holds A (a.a + b.b + c.c + a.b + b.c + c.a) / 6 of the squared distance to the origin).
    Unlike the RMS radius of the vertices, it does not depend on how the vertices spread over the surface."""
    a, b, c = (verts[:, faces[:, k]] for k in range(3))
    area = 0.5 * torch.linalg.cross(b - a, c - a, dim=-1).norm(dim=-1)
    total = area.sum(-1).clamp_min(1e-30)
    centroid = (area[..., None] * (a + b + c)).sum(1) / (3 * total[:, None])
    a, b, c = (p - centroid[:, None] for p in (a, b, c))
    second = (a * a + b * b + c * c + a * b + b * c + c * a).sum(-1) / 6
    return ((area * second).sum(-1) / total).sqrt()


def scale_to(verts: torch.Tensor, reference: torch.Tensor, faces: torch.Tensor | None = None,
             reference_faces: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) factor that brings centred (B,V,3) `verts` to the size of centred `reference` (B,N,3): of their
    surfaces (`surface_radius`) when both meshes' faces are given, else of their vertices (RMS radius,
    which equals the surfaces' only when the vertices spread alike: true of meshes of one topology)."""
    if faces is not None and reference_faces is not None:
        return surface_radius(reference, reference_faces) / surface_radius(verts, faces).clamp_min(1e-12)

    def rms(v):
        return v.pow(2).sum(-1).mean(-1).sqrt()

    return rms(reference) / rms(verts).clamp_min(1e-12)


def scaled_like(verts: torch.Tensor, reference: torch.Tensor, faces: torch.Tensor | None = None,
                reference_faces: torch.Tensor | None = None) -> torch.Tensor:
    """Rescale centred (B,V,3) `verts` to the size of centred `reference` (B,N,3) (see `scale_to`): a
    single image fixes a shape only up to scale (a larger object further away looks the same)."""
    return verts * scale_to(verts, reference, faces, reference_faces)[:, None, None]


def centred(verts: torch.Tensor) -> torch.Tensor:
    return verts - verts.mean(dim=-2, keepdim=True)


def rotate_y(verts: torch.Tensor, angle_deg: float) -> torch.Tensor:
    """Turn (..., 3) points by `angle_deg` about the y axis, the way a camera's azimuth turns: the
    object turned by t and seen from azimuth a + t gives the image of the unturned one seen from a."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    rotation = verts.new_tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    return verts @ rotation.T


FRAME_STEP_DEG = 5.0
"""Resolution of the search for the frame alignment's turn."""


def frame_alignment(pred_verts: torch.Tensor, gt_verts: torch.Tensor, pred_azimuth_deg: torch.Tensor,
                    gt_azimuth_deg: torch.Tensor, scale: torch.Tensor | None = None,
                    chunk: int = 64) -> dict[str, float]:
    """Metrics after the one turn about y, shared by all images, that best maps the predicted object
    frame onto the ground truth's.

    Self-supervised training learns some object frame; which way it faces is arbitrary (the template
    is symmetric under half turns). One turn `t` for the whole split (searched in `FRAME_STEP_DEG`
    steps, minimising the mean scale-aligned Chamfer distance) is applied to every predicted mesh,
    and the predicted azimuths are read as `a - t`. Per-image alignment would hide a wrong camera;
    a single turn cannot.

    Args: centred (N,V,3) predicted and (N,M,3) ground-truth vertices, (N,) azimuths in degrees, and
        the (N,) factors that bring each prediction to its ground truth's size (default: `scale_to` of
        the vertices).

    Returns `frame_turn_deg` (t), `chamfer_aligned`, `chamfer_scaled_aligned`, `azimuth_err_aligned_deg`.
    """
    def mean_chamfer(verts: torch.Tensor) -> float:
        total = 0.0
        for start in range(0, verts.shape[0], chunk):
            total += float(chamfer_distance(verts[start:start + chunk], gt_verts[start:start + chunk],
                                            per_sample=True).sum())
        return total / verts.shape[0]

    if scale is None:
        scale = scale_to(pred_verts, gt_verts)
    scaled = pred_verts * scale[:, None, None]  # a turn about the centre keeps the size
    turns = [k * FRAME_STEP_DEG for k in range(round(360 / FRAME_STEP_DEG))]
    turn = min(turns, key=lambda t: mean_chamfer(rotate_y(scaled, -t)))
    return {
        "frame_turn_deg": turn,
        "chamfer_aligned": mean_chamfer(rotate_y(pred_verts, -turn)),
        "chamfer_scaled_aligned": mean_chamfer(rotate_y(scaled, -turn)),
        "azimuth_err_aligned_deg": float(azimuth_error(pred_azimuth_deg - turn, gt_azimuth_deg).mean()),
    }


# ----------------------------------------------------------------------------- parameters and FLOPs


@torch.no_grad()
def count_flops(module: torch.nn.Module, *inputs) -> int:
    """FLOPs of one forward pass (multiply-add = 2 FLOPs), counted by PyTorch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        module(*inputs)
    return counter.get_total_flops()


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def encoder_complexity(encoder, height: int, width: int) -> dict[str, dict[str, int]]:
    """Parameters and forward FLOPs of an `AttributeEncoder` on one 1x4xHxW image.

    Returns {part: {"params": int, "flops": int}} for the camera, shape, texture and light encoders,
    the background encoder when the model has one, and "total" (the whole encoder). FLOPs follow
    `count_flops` (multiply-add = 2); the encoder is evaluated in eval mode, then restored.
    """
    was_training = encoder.training
    encoder.eval()
    x = torch.rand(1, 4, height, width, device=encoder.template.device)
    parts = {
        "camera": (encoder.camera_encoder, (x, encoder.template)),
        "shape": (encoder.shape_encoder, (x, encoder.template, encoder.laplacian)),
        "texture": (encoder.texture_encoder, (x,)),
        "light": (encoder.light_encoder, (x,)),
        "background": (encoder.background_encoder, (x,)),
    }
    result = {name: {"params": count_parameters(module), "flops": count_flops(module, *args)}
              for name, (module, args) in parts.items() if module is not None}
    result["total"] = {"params": count_parameters(encoder), "flops": count_flops(encoder, x)}
    encoder.train(was_training)
    return result


# ----------------------------------------------------------------------------- FID


def _avg_pool_without_padding(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _TFPoolBranch:
    """Mixin for torchvision's Inception blocks, whose last branch pools the block input: recompute
    that branch with `pool`, the pooling of the TensorFlow graph the FID weights come from (border
    averages over the valid pixels only; max pooling in the last block)."""

    pool = staticmethod(_avg_pool_without_padding)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = super()._forward(x)
        outputs[-1] = self.branch_pool(self.pool(x))
        return outputs


class _FIDInceptionA(_TFPoolBranch, InceptionA):
    pass


class _FIDInceptionC(_TFPoolBranch, InceptionC):
    pass


class _FIDInceptionE(_TFPoolBranch, InceptionE):
    pass


class _FIDInceptionEMaxPool(_TFPoolBranch, InceptionE):
    pool = staticmethod(_max_pool)


class FIDInception(Inception3):
    """Inception-v3 as FID defines it (pytorch-fid's `FIDInceptionA/C/E` variant of torchvision's
    network, 1008 classes, no auxiliary head); `forward` returns the 2048-d pool3 features.

    Build it with random weights here; `load_fid_inception` reads the real ones.
    """

    FEATURE_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                      "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                      "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")

    def __init__(self):
        blocks = [BasicConv2d, _FIDInceptionA, InceptionB, _FIDInceptionC, InceptionD, _FIDInceptionE,
                  InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, inception_blocks=blocks, init_weights=False)
        self.Mixed_7c = _FIDInceptionEMaxPool(2048)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) RGB in [0,1], any size -> (B,2048) features (input resized bilinearly to 299x299)."""
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for name in self.FEATURE_LAYERS:
            x = getattr(self, name)(x)
        return x.flatten(1)


def load_fid_inception(path: str | Path, device: torch.device | str = "cpu") -> FIDInception:
    """The FID Inception with pytorch-fid's weights from a local file (never downloaded here).

    Raises FileNotFoundError for a missing file and ValueError for a file with other weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--inception {path} not found: give the local path of pytorch-fid's "
                                f"{FID_WEIGHTS_NAME}, or leave --inception out to skip FID")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = FIDInception()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} does not hold pytorch-fid's Inception weights ({FID_WEIGHTS_NAME}): "
                         f"{str(err)[:300]}") from None
    return model.to(device).eval()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and covariance (D, D) (unbiased, rows are samples), float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID needs (N, D) features with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance `|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))` between two Gaussians (float64).

    Tr(sqrtm(S1 S2)) is the sum of the square roots of the eigenvalues of S1 S2, which are real and
    >= 0 in exact arithmetic (S1 S2 is similar to the PSD S1^1/2 S2 S1^1/2); the real part of the
    principal roots drops rounding noise (tiny negative or imaginary parts). This needs no matrix square
    root: scipy's `sqrtm`, which pytorch-fid uses, gives the same value up to rounding and is 4x slower
    for 2048-d features.
    """
    mu1, sigma1, mu2, sigma2 = (np.asarray(v, dtype=np.float64) for v in (mu1, sigma1, mu2, sigma2))
    diff = mu1 - mu2
    trace_sqrt = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two (N, D) feature sets."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


# ----------------------------------------------------------------------------- evaluation


def _fid_views(attrs, template, height: int, width: int, azi_scope: float,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The novel views the rotation FIDs use (RGB on white): a uniformly random azimuth and that + 90
    (`rotation`), the predicted azimuth +90 and -90 (`rotation90`); 2B images each."""
    batch, device = attrs.batch_size, attrs.azimuth_deg.device
    random_az = -(torch.rand(batch, generator=generator) * azi_scope - azi_scope / 2).to(device)
    azimuths = {"rotation": (random_az, random_az + 90),
                "rotation90": (attrs.azimuth_deg + 90, attrs.azimuth_deg - 90)}
    return {name: torch.cat([render_attributes(replace(attrs, azimuth_deg=az), template, height, width).rgb
                             for az in pair])
            for name, pair in azimuths.items()}


@torch.no_grad()
def evaluate(encoder, loader, template, height: int, width: int, device, *, ssim_upscale: int = 1,
             jpeg: bool = False, progress: bool = False, inception: FIDInception | None = None,
             azi_scope: float = 360.0, seed: int = 0, on_batch: Callable | None = None,
             initial_verts: torch.Tensor | None = None) -> dict[str, float]:
    """Reconstruct every test image and average the metrics (encoder put in eval mode, then restored).

    Args:
        encoder, template: the model; loader: test items (see `datasets`); height, width: image size.
        ssim_upscale: also report `ssim_x<k>`, the SSIM after a k-times bicubic upscale (k > 1).
        jpeg: measure on quality-100 JPEG round trips of the images and masks (the original's files).
        inception: compute `fid_recon`, `fid_rotation`, `fid_rotation90` with this network.
        azi_scope, seed: range in degrees and seed of the random azimuths of `fid_rotation`.
        on_batch: called as `on_batch(batch, attrs, recon)` per batch (recon: `RenderOutput`).
        initial_verts: (V,3) the run's initial template, the baseline of `chamfer_template` (default:
            `template.verts`, which after training is the learned template).

    Returns a dict with `mask_iou` and `ssim` (+ `ssim_x<k>`, FIDs as asked), plus for data with
    ground truth (items holding `verts` and camera) `chamfer`, `chamfer_template` (the untrained
    template's Chamfer, for scale), `chamfer_scaled` / `chamfer_template_scaled` (each shape first
    rescaled to the ground truth's size, see `scale_to`: of the surfaces when items carry the ground
    truth's `faces`), `azimuth_err_deg`, `azimuth_err_mirror_deg`,
    `elevation_err_deg`, `distance_err`, `distance_err_scaled` (the predicted distance times the scale
    of `chamfer_scaled`, i.e. at the true object size), `offset_err` (Euclidean, of the look-at point), and
    the same after the split's best turn of the predicted frame (see `frame_alignment`).
    """
    def prepare(images: torch.Tensor) -> torch.Tensor:
        return jpeg_round_trip(images) if jpeg else images

    was_training = encoder.training
    encoder.eval()
    sums: dict[str, float] = {}
    features: dict[str, list[np.ndarray]] = {name: [] for name in ("real", *FID_SETS)}
    generator = torch.Generator().manual_seed(seed)
    count = 0
    frames: list[tuple[torch.Tensor, ...]] = []  # per batch: predicted, true vertices and azimuths
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        x = batch["images"].to(device)
        attrs = encoder(x, 0)
        out = render_attributes(attrs, template, height, width)
        if on_batch is not None:
            on_batch(batch, attrs, out)
        pred_rgb, pred_mask = prepare(out.rgb), prepare(out.silhouette)
        gt_rgb, gt_mask = prepare(whiten(x)), prepare(x[:, 3:])
        per_image = {
            "mask_iou": mask_iou(pred_mask[:, 0], gt_mask[:, 0]),
            "ssim": ssim(pred_rgb, gt_rgb),
        }
        if ssim_upscale > 1:
            per_image[f"ssim_x{ssim_upscale}"] = ssim(pred_rgb, gt_rgb, upscale=ssim_upscale)
        if "verts" in batch:
            gt_verts = centred(batch["verts"].to(device).float())
            pred_verts = centred(attrs.verts)
            start = template.verts if initial_verts is None else initial_verts.to(device)
            init = centred(start).expand_as(pred_verts)
            # The sizes are compared on the surfaces where the ground truth has faces (the birds, whose
            # vertices crowd at the beak and tail), else on the vertices.
            gt_faces = batch["faces"][0].to(device).long() if "faces" in batch else None
            scale = scale_to(pred_verts, gt_verts, template.faces, gt_faces)
            per_image["chamfer"] = chamfer_distance(pred_verts, gt_verts, per_sample=True)
            per_image["chamfer_template"] = chamfer_distance(init, gt_verts, per_sample=True)
            per_image["chamfer_scaled"] = chamfer_distance(pred_verts * scale[:, None, None], gt_verts,
                                                           per_sample=True)
            per_image["chamfer_template_scaled"] = chamfer_distance(
                scaled_like(init, gt_verts, template.faces, gt_faces), gt_verts, per_sample=True)
            az_true = batch["azimuth_deg"].to(device).float()
            per_image["azimuth_err_deg"] = azimuth_error(attrs.azimuth_deg, az_true)
            per_image["azimuth_err_mirror_deg"] = azimuth_error(attrs.azimuth_deg, az_true, mirror=True)
            per_image["elevation_err_deg"] = (attrs.elevation_deg - batch["elevation_deg"].to(device)).abs()
            true_distance = batch["distance"].to(device)
            per_image["distance_err"] = (attrs.distance - true_distance).abs()
            # The object scaled by s about its origin, seen from s times the distance, looks the same:
            # the distance is only defined together with the size, so also compare it at the true size.
            scaled_distance = attrs.distance * scale
            per_image["distance_err_scaled"] = (scaled_distance - true_distance).abs()
            per_image["offset_err"] = (attrs.offset - batch["offset"].to(device)).norm(dim=1)
            frames.append((pred_verts, gt_verts, attrs.azimuth_deg, az_true, scale))
        if inception is not None:
            views = {"real": gt_rgb, "recon": pred_rgb}
            views.update((name, prepare(images)) for name, images in
                         _fid_views(attrs, template, height, width, azi_scope, generator).items())
            for name, images in views.items():
                features[name].append(inception(images).double().cpu().numpy())
        for k, v in per_image.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
        count += x.shape[0]
    encoder.train(was_training)
    if count == 0:
        raise ValueError("the evaluation split is empty: nothing to evaluate")
    result = {k: v / count for k, v in sums.items()}
    if frames:
        result.update(frame_alignment(*(torch.cat(parts) for parts in zip(*frames, strict=True))))
    if inception is not None:
        real = np.concatenate(features["real"])
        for name in FID_SETS:
            result[f"fid_{name}"] = fid_from_features(real, np.concatenate(features[name]))
    return result
