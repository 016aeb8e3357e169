"""Evaluation metrics: mask IoU, SSIM, 3-D accuracy on synthetic data, parameters and FLOPs.

Conventions (data-eval-vis.md §3.1, with the deliberate differences listed in the README):
- mask IoU: soft IoU of the rendered DIB-R silhouette against the ground-truth mask, per image,
  averaged (Kaolin's `1 - mask_iou`); computed on tensors, not on JPEG round trips unless asked.
- SSIM: `pytorch_msssim.ssim` (data_range 1, 11x11 Gaussian window) between the whitened input and
  the render on white, per image, averaged; optionally after a 2x bicubic upscale (the original
  test.py does that for CUB).
- 3-D (synthetic data, which has ground truth): Chamfer distance between the predicted and the
  ground-truth mesh vertices, both centred at the origin (the object frame the renderer uses; the
  squared-distance, mean-both-ways convention of the training loss), and camera errors.
- FLOPs: PyTorch's own counter (`torch.utils.flop_counter`), where a multiply-add counts as 2 FLOPs.
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_msssim import ssim as _ssim
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from networks.losses import chamfer_distance
from renderer.shading import mask_iou


def whiten(images: torch.Tensor) -> torch.Tensor:
    """(B,4,H,W) RGB + mask -> (B,3,H,W) RGB composited on white by the mask."""
    rgb, mask = images[:, :3], images[:, 3:]
    return rgb * mask + (1 - mask)


def ssim(pred: torch.Tensor, target: torch.Tensor, upscale: int = 1) -> torch.Tensor:
    """Per-image SSIM of (B,3,H,W) images in [0,1] -> (B,); `upscale` > 1 resizes bicubically first."""
    if upscale > 1:
        size = (pred.shape[-2] * upscale, pred.shape[-1] * upscale)
        pred = F.interpolate(pred, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        target = F.interpolate(target, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
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
    front/back-symmetric object seen from a and from 180 - a looks the same."""
    err = wrap_degrees(pred_deg - true_deg).abs()
    if mirror:
        err = torch.minimum(err, wrap_degrees(180.0 - pred_deg - true_deg).abs())
    return err


def centred(verts: torch.Tensor) -> torch.Tensor:
    return verts - verts.mean(dim=-2, keepdim=True)


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
def evaluate(encoder, loader, template, height: int, width: int, device, *, ssim_upscale: int = 1,
             jpeg: bool = False, progress: bool = False) -> dict[str, float]:
    """Reconstruct every test image and average the metrics (encoder put in eval mode, then restored).

    Returns a dict with `mask_iou` and `ssim`, plus for data with ground truth (items holding `verts`
    and camera) `chamfer`, `chamfer_template` (the untrained template's Chamfer, for scale),
    `azimuth_err_deg`, `azimuth_err_mirror_deg`, `elevation_err_deg` and `distance_err`.
    """
    from tqdm import tqdm

    from utils.model import render_attributes

    was_training = encoder.training
    encoder.eval()
    sums: dict[str, float] = {}
    count = 0
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        x = batch["images"].to(device)
        attrs = encoder(x, 0)
        out = render_attributes(attrs, template, height, width)
        pred_rgb, pred_mask, gt_rgb, gt_mask = out.rgb, out.silhouette, whiten(x), x[:, 3:]
        if jpeg:
            pred_rgb, gt_rgb = jpeg_round_trip(pred_rgb), jpeg_round_trip(gt_rgb)
            pred_mask, gt_mask = jpeg_round_trip(pred_mask), jpeg_round_trip(gt_mask)
        per_image = {
            "mask_iou": mask_iou(pred_mask[:, 0], gt_mask[:, 0]),
            "ssim": ssim(pred_rgb, gt_rgb, upscale=ssim_upscale),
        }
        if "verts" in batch:
            gt_verts = centred(batch["verts"].to(device).float())
            pred_verts = centred(attrs.verts)
            init = centred(template.verts).expand_as(pred_verts)
            per_image["chamfer"] = chamfer_distance(pred_verts, gt_verts, per_sample=True)
            per_image["chamfer_template"] = chamfer_distance(init, gt_verts, per_sample=True)
            az_true = batch["azimuth_deg"].to(device).float()
            per_image["azimuth_err_deg"] = azimuth_error(attrs.azimuth_deg, az_true)
            per_image["azimuth_err_mirror_deg"] = azimuth_error(attrs.azimuth_deg, az_true, mirror=True)
            per_image["elevation_err_deg"] = (attrs.elevation_deg - batch["elevation_deg"].to(device)).abs()
            per_image["distance_err"] = (attrs.distance - batch["distance"].to(device)).abs()
        for k, v in per_image.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
        count += x.shape[0]
    encoder.train(was_training)
    if count == 0:
        raise ValueError("the evaluation split is empty: nothing to evaluate")
    return {k: v / count for k, v in sums.items()}
