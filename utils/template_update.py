"""The "EM" template update: move the template toward the mean predicted offset.

`model-training.md` §6.5. Every `--em_gap` epochs the encoder predicts offsets for the "clean"
images (a narrower foreground-ratio window), samples with wild offsets are dropped, the rest are
averaged, smoothed with the Laplacian, clipped, and a small step is taken. The arithmetic lives in
`step_template` (pure tensors); the trainer only gathers the offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A sample whose offsets reach this magnitude somewhere (offsets are 0.5*tanh, so this is near
# saturation) is treated as a failed prediction: not averaged into the template and not used as
# a source of interpolated attributes.
BAD_OFFSET = 0.4


def bad_samples(delta_verts: torch.Tensor, limit: float = BAD_OFFSET) -> torch.Tensor:
    """Flag failed predictions.

    Args:
        delta_verts: (B, V, 3) predicted offsets.
    Returns:
        (B,) bool, True where some vertex's mean absolute offset over x, y, z exceeds `limit`.
        (The original tested only the last vertex, index -1 on the vertex axis.)
    """
    return delta_verts.abs().mean(dim=2).amax(dim=1) > limit


@dataclass(frozen=True)
class TemplateStep:
    verts: torch.Tensor  # (V, 3) the new template (or the old one if the step was rejected)
    used: int  # samples averaged
    crossings: int  # vertices whose z changed sign
    accepted: bool


def step_template(
    template: torch.Tensor,
    offset_sum: torch.Tensor,
    count: int,
    laplacian: torch.Tensor,
    *,
    em: float,
    step: float,
    warm_up: float,
    smooth: float,
    clip: float,
    white: bool,
    reject_crossing: bool,
) -> TemplateStep:
    """One template update from the summed offsets of `count` kept samples.

    Args:
        template: (V, 3) current template.
        offset_sum: (V, 3) sum over the kept samples of their (centred) offsets. A sum rather than a
            mean so that data-parallel ranks can all-reduce it before calling this.
        count: number of samples in the sum; with fewer than 2 the template is left unchanged.
        laplacian: (V, V) uniform Laplacian (row i: neighbour mean minus self).
        em: update mode; em >= 6 adds int(em - 5) smoothing passes to the first one.
        step: current step size (the caller decays it by 0.99 after each update).
        warm_up: current loss warm-up factor in [0.01, 1].
        smooth: Laplacian smoothing step (0 disables smoothing).
        clip: per-coordinate clip of the smoothed mean offset.
        white: re-centre the new template at the origin.
        reject_crossing: keep the old template if any vertex's z changes sign.
    """
    if count < 2:
        return TemplateStep(template, count, 0, False)
    delta = offset_sum / count
    if smooth > 0:
        passes = 1 + (int(em - 5) if em >= 6 else 0)
        for _ in range(passes):
            delta = delta + smooth * (laplacian @ delta)
    delta = delta.clamp(-clip, clip)
    new = template + warm_up * step * delta
    if white:
        new = new - new.mean(dim=0, keepdim=True)
    old_sign, new_sign = torch.sign(template[:, 2]), torch.sign(new[:, 2])
    crossings = int(((new_sign == -old_sign) & (old_sign != 0)).sum())
    if reject_crossing and crossings > 0:
        return TemplateStep(template, count, crossings, False)
    return TemplateStep(new, count, crossings, True)
