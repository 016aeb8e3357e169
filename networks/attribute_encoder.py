"""The AttributeEncoder (model-training.md §4.4) and the encoder-alternation schedule (§6.3)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from typing import Any

import torch
from torch import Tensor, nn

from networks.attributes import Attributes
from networks.encoders import (
    SCRATCH_TEXTURE_BLOCKS,
    BackgroundEncoder,
    CameraEncoder,
    LightEncoder,
    ShapeEncoder,
    TextureEncoder,
    check_image_size,
)

# Sub-encoders run frozen (no gradient, BN statistics untouched) in each mode; the background
# encoder is always trained.
FROZEN_BY_MODE: dict[int, frozenset[str]] = {
    0: frozenset(),
    1: frozenset({"shape"}),
    2: frozenset({"camera"}),
    3: frozenset({"camera", "texture", "light"}),
    4: frozenset({"shape", "camera"}),
    5: frozenset({"shape", "texture", "light"}),
}


def mode_for_iteration(update_shape: int, iteration: int) -> int:
    """Freeze mode of an iteration (``iteration`` counts from 0 in each epoch).

    - ``update_shape = -1``: cycle mode 3 (train shape), 4 (texture + light), 5 (camera);
    - ``update_shape = 0``: mode 0, everything trained;
    - ``update_shape = k > 0``: mode 2 (camera frozen) when ``iteration % k == 0``, else mode 1
      (shape frozen).

    The background encoder is trained in every mode.
    """
    if update_shape == -1:
        return (3, 4, 5)[iteration % 3]
    if update_shape == 0:
        return 0
    if update_shape > 0:
        return 2 if iteration % update_shape == 0 else 1
    raise ValueError(f"--update_shape must be -1, 0 or a positive period, got {update_shape}")


class AttributeEncoder(nn.Module):
    """Image batch -> :class:`Attributes` (camera, offsets, texture, light, optional background).

    The template is a persistent buffer (saved in the state_dict and so in every checkpoint);
    ``set_template`` replaces it after an EM update. The Laplacian is fixed and not saved.

    Args:
        template_verts: (V, 3) initial template.
        laplacian: (V, V) uniform Laplacian of the template mesh.
        height, width: input image size (the texture map is 2H x W).
        camera_backbone, shape_backbone, texture_backbone: backbone names (see ``networks.encoders``).
        pretrained: start ResNet/HRNet backbones from ImageNet weights.
        norm, nk, coordconv: options of the from-scratch conv blocks.
        local_features: template-local features in the camera and shape encoders (off: ``--nolpl``).
        predict_background: add the background encoder (``--bg``).
        drop_camera: dropout of the camera and light encoders.
        drop_shape: dropout of the shape encoder.
        drop_texture: dropout of the texture and background encoders (applied halved).
        texture_scratch_blocks: ResBlocks per stage of the from-scratch texture backbone.
        dist_range, elev_range, azi_scope: camera ranges (distance, elevation in degrees, azimuth scope).
        separate_elevation_head: the camera encoder's elevation from a head of its own (``CameraEncoder``).
    """

    def __init__(self, template_verts: Tensor, laplacian: Tensor, height: int, width: int, *,
                 camera_backbone: str = "none", shape_backbone: str = "none", texture_backbone: str = "none",
                 pretrained: bool = False, norm: str = "bn", nk: int = 5, coordconv: bool = True,
                 local_features: bool = True, predict_background: bool = False, drop_camera: float = 0.0,
                 drop_shape: float = 0.0, drop_texture: float = 0.0,
                 texture_scratch_blocks: tuple[int, int, int, int] = SCRATCH_TEXTURE_BLOCKS,
                 dist_range: tuple[float, float] = (2.0, 7.0), elev_range: tuple[float, float] = (0.0, 30.0),
                 azi_scope: float = 360.0, separate_elevation_head: bool = False):
        super().__init__()
        num_verts = template_verts.shape[0]
        if template_verts.shape != (num_verts, 3) or laplacian.shape != (num_verts, num_verts):
            raise ValueError(f"template (V,3) and Laplacian (V,V) expected, got {tuple(template_verts.shape)} "
                             f"and {tuple(laplacian.shape)}")
        check_image_size(height, width)
        self.height, self.width = height, width
        self.register_buffer("template", template_verts.detach().clone())
        self.register_buffer("laplacian", laplacian.detach().clone(), persistent=False)
        self.camera_encoder = CameraEncoder(camera_backbone, pretrained, nk, norm, coordconv, drop_camera,
                                            dist_range, elev_range, azi_scope, local_features,
                                            separate_elevation_head)
        self.shape_encoder = ShapeEncoder(num_verts, shape_backbone, pretrained, nk, norm, coordconv, drop_shape,
                                          local_features)
        self.texture_encoder = TextureEncoder(texture_backbone, pretrained, nk, norm, coordconv, drop_texture,
                                              texture_scratch_blocks)
        self.light_encoder = LightEncoder(nk, norm, coordconv, drop_camera)
        self.background_encoder = BackgroundEncoder(drop_texture) if predict_background else None
        # For CUDA inputs, run the five sub-encoders side by side, each on its own CUDA stream. They read
        # the same images and share no parameters, so the results are those of one after the other; their
        # many small kernels (batch 48 at 128 px fills a fraction of a large GPU) then overlap, and so do
        # their backward passes, which autograd runs on the streams of their forward ops. CPU inputs run
        # one after the other either way.
        self.concurrent = False

    @property
    def num_verts(self) -> int:
        return self.template.shape[0]

    def set_template(self, verts: Tensor) -> None:
        """Replace the template (V, 3) in place (after an EM update); later forwards read it."""
        if verts.shape != self.template.shape:
            raise ValueError(f"new template must have shape {tuple(self.template.shape)}, got {tuple(verts.shape)}")
        with torch.no_grad():
            self.template.copy_(verts)

    def shape_backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the shape encoder's backbone (pretrained or from scratch): the original trains
        them at 0.05 x lr (``--lr_shape_backbone``)."""
        return list(self.shape_encoder.backbone.parameters())

    def forward(self, images: Tensor, mode: int = 0) -> Attributes:
        """Encode a batch.

        Args:
            images: (B, 4, H, W) RGB in [0, 1] + binary mask, H x W as built.
            mode: freeze mode (``FROZEN_BY_MODE``, ``mode_for_iteration``). A frozen sub-encoder runs
                in the current train/eval mode but without gradient, and its BatchNorm running
                statistics are left as they were.

        Returns:
            Attributes with verts = template + delta_verts.
        """
        if images.dim() != 4 or images.shape[1:] != (4, self.height, self.width):
            raise ValueError(f"expected images (B,4,{self.height},{self.width}), got {tuple(images.shape)}")
        if mode not in FROZEN_BY_MODE:
            raise ValueError(f"unknown freeze mode {mode}; modes are {sorted(FROZEN_BY_MODE)}")
        frozen = FROZEN_BY_MODE[mode]

        def run(name: str, module: nn.Module, *args: Tensor):
            return _run_frozen(module, *args) if name in frozen else module(*args)

        template = self.template
        calls = [  # in the order that draws their dropout masks from the random stream
            partial(run, "camera", self.camera_encoder, images, template),
            partial(run, "shape", self.shape_encoder, images, template, self.laplacian),
            partial(run, "texture", self.texture_encoder, images),
            partial(run, "light", self.light_encoder, images),
        ]
        if self.background_encoder is not None:
            calls.append(partial(self.background_encoder, images))
        if self.concurrent and images.is_cuda:
            results = _on_streams(calls, _side_streams(images.device))
        else:
            results = [call() for call in calls]
        (azimuth, elevation, distance, offset), delta, texture, light = results[:4]
        background = results[4] if self.background_encoder is not None else None
        return Attributes(azimuth_deg=azimuth, elevation_deg=elevation, distance=distance, offset=offset,
                          verts=template.unsqueeze(0) + delta, delta_verts=delta, texture=texture, light=light,
                          background=background)


@cache
def _side_streams(device: torch.device) -> tuple[torch.cuda.Stream, ...]:
    """The sub-encoders' side streams on `device`, made once per process (not per model: a model's deep
    copy, e.g. the SWA average, shares them)."""
    return tuple(torch.cuda.Stream(device) for _ in range(4))


def _on_streams(calls: list[Callable[[], Any]], streams: tuple[torch.cuda.Stream, ...]) -> list[Any]:
    """Results of `calls`, the first run on the current CUDA stream and each other one on its own stream of
    `streams`, forked from the current stream and joined back into it (also inside a CUDA graph capture,
    where the fork and join become the graph's branches)."""
    current = torch.cuda.current_stream(streams[0].device)
    side = streams[:len(calls) - 1]
    for stream in side:  # forked before any call's work: each waits only for what came before the calls
        stream.wait_stream(current)
    results = [calls[0]()]
    for call, stream in zip(calls[1:], side, strict=True):
        with torch.cuda.stream(stream):
            results.append(call())
    for stream, result in zip(side, results[1:], strict=True):
        current.wait_stream(stream)
        for tensor in result if isinstance(result, tuple) else (result,):
            tensor.record_stream(current)  # its memory is not reused on `stream` before the current one is done
    return results


def _run_frozen(module: nn.Module, *args: Tensor):
    """Evaluate ``module`` as it is (train mode: batch statistics and dropout) with no gradient and
    without moving its BatchNorm running statistics (nor ``num_batches_tracked``). Equivalent to
    evaluating a deep copy; BatchNorm layers are told not to track statistics for the call instead of
    copying their buffers out and back, which cost a few GPU launches per layer on every step."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    try:
        for m in norms:
            m.track_running_stats = False
        with torch.no_grad():
            return module(*args)
    finally:
        for m in norms:
            m.track_running_stats = True
