"""Backbones and the five attribute encoders (model-training.md §4.4-§4.9).

Every encoder takes the (B, 4, H, W) input batch (RGB in [0, 1] + binary mask) and returns tensors.
The camera and shape encoders also read the current template (V, 3) and its Laplacian (V, V), passed
as forward arguments because the template changes during training.

Backbones (the ``backbone`` argument):

- ``none``: trained from scratch (``Base4C`` for camera/shape, ``ScratchPyramid`` for texture);
- ``res18``, ``res34``, ``res50``: torchvision ResNets with a 4-channel stem;
- ``hr18sv2``: timm's HRNet-W18-small-v2 with a 4-channel stem (optional extra ``pip install .[hrnet]``).

ImageNet weights are requested only with ``pretrained=True``; when they cannot be obtained (no
internet, no cache) a RuntimeError names the flag that trains from scratch instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from networks.blocks import (
    ChannelAttention,
    Conv2dBlock,
    MMPool,
    ResBlockHalf,
    ResBlocks,
    TextureBiFPN,
    init_output_layer,
    init_weights,
    normalize_4c,
)
from utils.cli import RunError

BACKBONES = ("none", "res18", "res34", "res50", "hr18sv2")
TEXTURE_BACKBONES = ("none", "res18", "res34")
SCRATCH_TEXTURE_BLOCKS = (1, 3, 3, 2)
"""ResBlocks per stage of the from-scratch texture trunk, as the original's."""

_SCRATCH_HINT = "pass --no-pretrained to train the backbone from scratch, or pick the backbone 'none'"


def _check_backbone(name: str, allowed: tuple[str, ...], role: str) -> None:
    if name not in allowed:
        raise ValueError(f"unknown {role} backbone {name!r}; choose one of {allowed}")


def _four_channel_stem(conv: nn.Conv2d) -> nn.Conv2d:
    """A copy of an RGB stem conv that takes RGB + mask; the mask filter is the mean of the RGB ones."""
    stem = nn.Conv2d(4, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        stem.weight[:, :3] = conv.weight
        stem.weight[:, 3] = conv.weight.mean(dim=1)
        if conv.bias is not None:
            stem.bias.copy_(conv.bias)
    return stem


def _load_pretrained(build: Callable[[], nn.Module], what: str) -> nn.Module:
    """Call a library constructor that downloads or reads ImageNet weights; fail with the fix."""
    try:
        return build()
    except Exception as err:  # network, cache and checksum failures all surface differently
        raise RunError(f"could not load ImageNet weights for {what} ({type(err).__name__}: {err}); "
                       f"{_SCRATCH_HINT}") from err


def _import_timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError("the hr18sv2 backbone needs timm: pip install .[hrnet] (or pick another backbone)") from err
    return timm


class Base4C(nn.Module):
    """From-scratch camera/shape backbone: (B,4,H,W) normalised -> (B,288,H/16,W/16)."""

    out_channels = 288

    def __init__(self, nk: int = 5, norm: str = "bn", coordconv: bool = True):
        super().__init__()
        self.layer3 = nn.Sequential(
            Conv2dBlock(4, 36, nk, 2, nk // 2, coordconv=coordconv),  # H -> H/2, 4 -> 36 (bias, no norm)
            ResBlockHalf(36, norm),                                  # H/2 -> H/4, 36 -> 72
            ResBlocks(1, 72, norm),
            ResBlockHalf(72, norm),                                  # H/4 -> H/8, 72 -> 144
            ResBlocks(3, 144, norm),
        )
        self.layer4 = nn.Sequential(
            ResBlockHalf(144, norm),                                 # H/8 -> H/16, 144 -> 288
            ResBlocks(3, 288, norm),
        )
        self.layer5 = ResBlocks(3, 288, norm)                        # H/16, 288 -> 288
        self.apply(init_weights)

    def forward(self, x: Tensor) -> Tensor:
        x4 = self.layer4(self.layer3(x))
        return x4 + self.layer5(x4)


class ResNet4C(nn.Module):
    """A torchvision ResNet trunk (no pooling, no fc) with a 4-channel stem.

    Args:
        name: 'res18', 'res34' or 'res50'.
        pretrained: start from the ImageNet weights (downloaded by torchvision, or read from its cache).
        last_stride: 2 keeps layer4's stride (output stride 32, the texture encoder); 1 removes it
            (output stride 16, the camera and shape encoders).
    """

    _FACTORIES = {
        "res18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 512),
        "res34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1, 512),
        "res50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 2048),
    }

    def __init__(self, name: str, pretrained: bool = False, last_stride: int = 2):
        super().__init__()
        _check_backbone(name, tuple(self._FACTORIES), "ResNet")
        factory, weights, self.out_channels = self._FACTORIES[name]
        if pretrained:
            net = _load_pretrained(lambda: factory(weights=weights), f"torchvision {name}")
        else:
            net = factory(weights=None)
        if last_stride == 1:
            block = net.layer4[0]
            block.downsample[0].stride = (1, 1)
            for conv in (block.conv1, block.conv2):  # the strided conv is conv1 (basic) or conv2 (bottleneck)
                conv.stride = (1, 1)
        self.stem = nn.Sequential(_four_channel_stem(net.conv1), net.bn1, net.relu, net.maxpool)  # H -> H/4
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def pyramid(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B,4,H,W) normalised -> features at strides 4, 8, 16 and 32 (16 with ``last_stride=1``)."""
        x2 = self.layer1(self.stem(x))
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        return x2, x3, x4, self.layer4(x4)

    def forward(self, x: Tensor) -> Tensor:
        return self.pyramid(x)[-1]


class HRNet4C(nn.Module):
    """timm HRNet-W18-small-v2 features (2048 channels, stride 32) with a 4-channel stem and a
    channel-attention gate."""

    out_channels = 2048

    def __init__(self, pretrained: bool = False):
        super().__init__()
        timm = _import_timm()
        if pretrained:
            net = _load_pretrained(lambda: timm.create_model("hrnet_w18_small_v2", pretrained=True, num_classes=0),
                                   "timm hrnet_w18_small_v2")
        else:
            net = timm.create_model("hrnet_w18_small_v2", pretrained=False, num_classes=0)
        net.conv1 = _four_channel_stem(net.conv1)
        self.net = net
        self.attention = ChannelAttention(self.out_channels)
        self.attention.apply(init_weights)

    def forward(self, x: Tensor) -> Tensor:  # (B,4,H,W) -> (B,2048,H/32,W/32)
        features = self.net.forward_features(x)
        return features * self.attention(features)


def build_backbone(name: str, pretrained: bool, nk: int, norm: str, coordconv: bool) -> nn.Module:
    """Camera/shape backbone by name; the module has an ``out_channels`` attribute.

    ResNets drop layer4's stride (output stride 16, like ``none``); HRNet has stride 32.
    """
    _check_backbone(name, BACKBONES, "camera/shape")
    if name == "none":
        return Base4C(nk, norm, coordconv)
    if name == "hr18sv2":
        return HRNet4C(pretrained)
    return ResNet4C(name, pretrained, last_stride=1)


def sample_template_features(features: Tensor, template_verts: Tensor, align_corners: bool) -> Tensor:
    """Bilinearly sample a feature map at the template's raw (x, y), as the original does.

    The template's x and y are used directly as grid_sample coordinates: no camera is involved, and
    grid y points down while mesh y points up (the top of the template reads the bottom of the image).

    Args:
        features: (B, C, h, w) feature map.
        template_verts: (V, 3) template (its gradient is not used).
        align_corners: grid_sample convention (camera encoder False, shape encoder True).

    Returns:
        (B, C, V, 1) features per vertex (0 outside the map).
    """
    b = features.shape[0]
    grid = template_verts.detach()[:, :2].to(features.dtype).view(1, -1, 1, 2).expand(b, -1, -1, -1)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)


def azimuth_from_xy(x: Tensor, y: Tensor, azi_scope: float) -> Tensor:
    """Azimuth head: ``-sign(y)·acos(x/r)·azi_scope/(2π)`` in degrees, r = sqrt(x² + y² + 1e-12) + 1e-6.

    With ``azi_scope = 360`` the result lies in (-180, 180]; (x, y) = (0, 1) gives -90.
    """
    r = torch.sqrt(x * x + y * y + 1e-12) + 1e-6
    phi_deg = torch.sign(y) * torch.acos(x / r) * (180.0 / math.pi)
    return -phi_deg * (azi_scope / 360.0)


def _check_range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not lo <= hi:
        raise ValueError(f"{name} must be (min, max) with min <= max, got {value}")
    return lo, hi


class CameraEncoder(nn.Module):
    """Camera from an image: azimuth, elevation (degrees), distance and look-at offset (§4.5).

    Args:
        backbone: one of ``BACKBONES``.
        pretrained: ImageNet weights for a ResNet/HRNet backbone.
        nk: kernel size of the first conv of the ``none`` backbone.
        norm, coordconv: options of the ``none`` backbone's conv blocks.
        droprate: dropout before each head's output layer.
        dist_range, elev_range: (min, max) of the distance and of the elevation in degrees.
        azi_scope: azimuth range in degrees (360: the full circle).
        local_features: also pool features sampled at the template's vertices (the ``--nolpl``
            ablation turns this off).
        separate_elevation_head: the elevation from its own head instead of the second output of the
            distance head (the original's shared head; ``--separate_elevation_head``).
    """

    def __init__(self, backbone: str = "none", pretrained: bool = False, nk: int = 5, norm: str = "bn",
                 coordconv: bool = True, droprate: float = 0.0, dist_range: tuple[float, float] = (2.0, 7.0),
                 elev_range: tuple[float, float] = (0.0, 30.0), azi_scope: float = 360.0,
                 local_features: bool = True, separate_elevation_head: bool = False):
        super().__init__()
        self.dist_range = _check_range("dist_range", dist_range)
        self.elev_range = _check_range("elev_range", elev_range)
        self.azi_scope = float(azi_scope)
        self.local_features = local_features
        self.backbone = build_backbone(backbone, pretrained, nk, norm, coordconv)
        self.global_pool = MMPool((2, 2))
        # Vertices are pooled in OBJ order: rows split them into two halves, the single column is repeated.
        self.local_pool = MMPool((2, 2)) if local_features else None
        in_features = self.backbone.out_channels * 4 * (2 if local_features else 1)

        def head(outputs: int = 2) -> nn.Sequential:
            layers = nn.Sequential(nn.Linear(in_features, 128), nn.BatchNorm1d(128), nn.Dropout(droprate),
                                   nn.Linear(128, outputs))
            layers.apply(init_weights)
            layers[-1].apply(init_output_layer)
            return layers

        self.separate_elevation_head = separate_elevation_head
        if separate_elevation_head:
            self.distance_head, self.elevation_head = head(1), head(1)
        else:
            self.dist_elev_head = head()
        self.azimuth_head = head()
        self.offset_head = head()

    def forward(self, images: Tensor, template_verts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """images (B,4,H,W), template_verts (V,3) -> azimuth_deg (B,), elevation_deg (B,),
        distance (B,), offset (B,2) in (-1, 1)."""
        features = self.backbone(normalize_4c(images))                       # (B,C,h,w)
        pooled = [self.global_pool(features)]                                # (B,C,2,2)
        if self.local_pool is not None:
            local = sample_template_features(features, template_verts, align_corners=False)  # (B,C,V,1)
            pooled.append(self.local_pool(local))                            # (B,C,2,2)
        x = torch.cat(pooled, dim=1).flatten(1)                              # (B,8C) or (B,4C)

        # The output mappings run in float32 under bf16 autocast too: in bf16, x / r in the azimuth's
        # acos rounds to 1 and its gradient becomes infinite.
        if self.separate_elevation_head:
            unit_distance, unit_elevation = (torch.sigmoid(h(x).float())[:, 0]
                                             for h in (self.distance_head, self.elevation_head))
        else:
            unit_distance, unit_elevation = torch.sigmoid(self.dist_elev_head(x).float()).unbind(1)
        (d_min, d_max), (e_min, e_max) = self.dist_range, self.elev_range
        distance = d_min + unit_distance * (d_max - d_min)
        elevation = e_min + unit_elevation * (e_max - e_min)
        azimuth_xy = self.azimuth_head(x).float()
        azimuth = azimuth_from_xy(azimuth_xy[:, 0], azimuth_xy[:, 1], self.azi_scope)
        offset = torch.tanh(self.offset_head(x).float())
        return azimuth, elevation, distance, offset


class ShapeEncoder(nn.Module):
    """Per-vertex offsets of the template (§4.6).

    Per vertex: [template-local feature, global feature, neighbour difference of the local feature,
    template xyz] -> point-wise MLP -> 3 values; then one linear layer over all 3V values,
    ``0.5·tanh``, and the mean offset of each sample is removed.

    Args:
        num_verts: V.
        backbone, pretrained, nk, norm, coordconv: see :class:`CameraEncoder`.
        droprate: dropout in the point-wise MLP.
        local_features: ``False`` is the ``--nolpl`` ablation (global pooling -> BN -> linear to 3V).
    """

    def __init__(self, num_verts: int, backbone: str = "none", pretrained: bool = False, nk: int = 5,
                 norm: str = "bn", coordconv: bool = True, droprate: float = 0.0, local_features: bool = True):
        super().__init__()
        self.num_verts = num_verts
        self.local_features = local_features
        self.backbone = build_backbone(backbone, pretrained, nk, norm, coordconv)
        channels = self.backbone.out_channels
        self.global_pool = MMPool((1, 1))
        if local_features:
            self.point_mlp = nn.Sequential(
                nn.Conv1d(3 * channels + 3, 256, 1),  # (B,3C+3,V) -> (B,256,V)
                nn.BatchNorm1d(256),
                nn.LeakyReLU(0.2),
                nn.Dropout(droprate),
                nn.Conv1d(256, 3, 1),                 # (B,256,V) -> (B,3,V)
                nn.BatchNorm1d(3),
            )
            self.point_mlp.apply(init_weights)
            self.global_norm = None
            self.output = nn.Linear(3 * num_verts, 3 * num_verts)
        else:
            self.point_mlp = None
            self.global_norm = nn.BatchNorm2d(channels)
            self.global_norm.apply(init_weights)
            self.output = nn.Linear(channels, 3 * num_verts)
        self.output.apply(init_output_layer)

    def forward(self, images: Tensor, template_verts: Tensor, laplacian: Tensor) -> Tensor:
        """images (B,4,H,W), template_verts (V,3), laplacian (V,V) -> offsets (B,V,3), each sample
        zero-mean over vertices, |offset| < 0.5 before centring."""
        b, v = images.shape[0], self.num_verts
        if template_verts.shape != (v, 3) or laplacian.shape != (v, v):
            raise ValueError(f"shape encoder built for {v} vertices got template {tuple(template_verts.shape)} "
                             f"and Laplacian {tuple(laplacian.shape)}")
        features = self.backbone(normalize_4c(images))                                     # (B,C,h,w)
        glob = self.global_pool(features)                                                  # (B,C,1,1)
        if self.point_mlp is None:
            raw = self.output(self.global_norm(glob).flatten(1))                           # (B,3V)
        else:
            local = sample_template_features(features, template_verts, align_corners=True)[..., 0]  # (B,C,V)
            per_vertex = torch.cat([
                local,
                glob[..., 0].expand(-1, -1, v),
                neighbour_difference(local, laplacian),
                template_verts.detach().t().to(local.dtype).unsqueeze(0).expand(b, -1, -1),  # (B,3,V)
            ], dim=1)                                                                        # (B,3C+3,V)
            raw = self.output(self.point_mlp(per_vertex).transpose(1, 2).reshape(b, 3 * v))  # (B,3V), xyz per vertex
        delta = 0.5 * torch.tanh(raw).view(b, v, 3)
        return delta - delta.mean(dim=1, keepdim=True)


def neighbour_difference(local: Tensor, laplacian: Tensor) -> Tensor:
    """The original's neighbour-difference feature: ``local @ L`` (a right multiplication).

    With L[i, j] = 1/deg(i) for neighbours and -1 on the diagonal, vertex j receives
    ``Σ_{i ∈ N(j)} local_i / deg(i) − local_j``.

    Args:
        local: (B, C, V) per-vertex features.
        laplacian: (V, V) uniform Laplacian.

    Returns:
        (B, C, V).
    """
    return torch.matmul(local, laplacian.to(local.dtype))


class ScratchPyramid(nn.Module):
    """From-scratch texture backbone with the pyramid a ResNet-18/34 gives TextureBiFPN.

    A stride-2 stem and four (ResBlockHalf + ResBlocks) stages: (B,4,H,W) normalised -> 64/128/256/512
    channels at strides 4/8/16/32. The original's custom texture trunk has this layout with 1, 3, 3
    and 2 ResBlocks per stage (``blocks``).
    """

    def __init__(self, nk: int = 5, norm: str = "bn", coordconv: bool = True,
                 blocks: tuple[int, int, int, int] = SCRATCH_TEXTURE_BLOCKS):
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"the texture pyramid needs four stages of at least one ResBlock, got {blocks}")
        self.stem = Conv2dBlock(4, 32, nk, 2, nk // 2, norm="bn", coordconv=coordconv)  # H -> H/2, 4 -> 32
        self.levels = nn.ModuleList(
            nn.Sequential(ResBlockHalf(c, norm), ResBlocks(n, 2 * c, norm))  # H/s -> H/2s, c -> 2c
            for c, n in zip((32, 64, 128, 256), blocks, strict=True)
        )
        self.apply(init_weights)

    def pyramid(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = self.stem(x)
        outputs = []
        for level in self.levels:
            x = level(x)
            outputs.append(x)
        return tuple(outputs)


class TextureEncoder(nn.Module):
    """UV texture sampled from the input image by a predicted flow field (§4.7).

    Args:
        backbone: 'none' (:class:`ScratchPyramid`), 'res18' or 'res34' (ResNet trunk, stride 32).
        pretrained: ImageNet weights for the ResNet trunk.
        nk, norm, coordconv: options of the 'none' backbone.
        droprate: the flow head uses dropout ``droprate / 2``.
        scratch_blocks: ResBlocks per stage of the 'none' backbone.
    """

    def __init__(self, backbone: str = "none", pretrained: bool = False, nk: int = 5, norm: str = "bn",
                 coordconv: bool = True, droprate: float = 0.0,
                 scratch_blocks: tuple[int, int, int, int] = SCRATCH_TEXTURE_BLOCKS):
        super().__init__()
        _check_backbone(backbone, TEXTURE_BACKBONES, "texture")
        self.backbone = (ScratchPyramid(nk, norm, coordconv, scratch_blocks) if backbone == "none"
                         else ResNet4C(backbone, pretrained, last_stride=2))
        self.decoder = TextureBiFPN(droprate)

    def flow(self, images: Tensor) -> Tensor:
        """images (B,4,H,W) -> (B,2,H,W) sampling grid in [-1, 1] (x, y) over the input image."""
        check_image_size(images.shape[-2], images.shape[-1])
        return self.decoder(*self.backbone.pyramid(normalize_4c(images)))

    def forward(self, images: Tensor) -> Tensor:
        """images (B,4,H,W) -> texture (B,3,2H,W): the sampled half on top, its vertical flip below.

        The RGB is sampled as given (with the real background under ``--bg``), bicubic with
        align_corners=True, so values can overshoot [0, 1] slightly; the renderer clamps.
        """
        grid = self.flow(images).permute(0, 2, 3, 1)                                    # (B,H,W,2)
        half = F.grid_sample(images[:, :3], grid, mode="bicubic", padding_mode="zeros", align_corners=True)
        return torch.cat([half, half.flip(2)], dim=2)                                   # (B,3,2H,W)


def check_image_size(height: int, width: int) -> None:
    """Raise ValueError unless H and W suit the texture encoder: multiples of 32 (its stride) and at
    least 64 (its ASPP at stride 4 reflects by 8 pixels)."""
    if height % 32 or width % 32 or min(height, width) < 64:
        raise ValueError(f"the texture encoder needs height and width that are multiples of 32 and at least 64, "
                         f"got {height}x{width}: change --imageSize / --ratio")


class LightEncoder(nn.Module):
    """Nine spherical-harmonic coefficients (§4.8): L0 in [2.5, 3.5], the others in [-0.1, 0.1].

    Args:
        nk: kernel size of the five stride-2 convs.
        norm: their normalisation.
        coordconv: coordinate channels before the first two convs.
        droprate: dropout before the output layer.
    """

    def __init__(self, nk: int = 5, norm: str = "bn", coordconv: bool = True, droprate: float = 0.0):
        super().__init__()
        pad = nk // 2
        self.features = nn.Sequential(
            Conv2dBlock(4, 32, nk, 2, pad, norm=norm, coordconv=coordconv),   # H -> H/2
            Conv2dBlock(32, 64, nk, 2, pad, norm=norm, coordconv=coordconv),  # H/2 -> H/4
            Conv2dBlock(64, 96, nk, 2, pad, norm=norm),                       # H/4 -> H/8
            Conv2dBlock(96, 192, nk, 2, pad, norm=norm),                      # H/8 -> H/16
            Conv2dBlock(192, 96, nk, 2, pad, norm=norm),                      # H/16 -> H/32
            MMPool((1, 1)),                                                   # -> (B,96,1,1)
        )
        self.head = nn.Sequential(nn.Linear(96, 48), nn.BatchNorm1d(48), nn.Dropout(droprate), nn.Linear(48, 9))
        self.features.apply(init_weights)
        self.head.apply(init_weights)
        self.head[-1].apply(init_output_layer)
        self.register_buffer("scale", torch.tensor([0.5] + [0.1] * 8), persistent=False)
        self.register_buffer("base", torch.tensor([3.0] + [0.0] * 8), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """images (B,4,H,W) -> light (B,9); (3, 0, ..., 0) at initialisation."""
        x = self.head(self.features(normalize_4c(images)).flatten(1))
        return torch.tanh(x) * self.scale + self.base


class BackgroundEncoder(nn.Module):
    """Background image from the input with the foreground blacked out (§4.9).

    The input is ``rgb·(1 − mask)``, not normalised. Output (B,3,H,W) in (0, 1); H and W must be even.
    """

    def __init__(self, droprate: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            Conv2dBlock(3, 32, 3, 2, 1, activation="none"),     # H -> H/2, 3 -> 32
            ResBlocks(3, 32, norm="none"),
            nn.Upsample(scale_factor=2.0, mode="nearest"),      # H/2 -> H
            nn.Dropout2d(droprate / 2),
            Conv2dBlock(32, 3, 3, 1, 1, activation="none"),     # 32 -> 3
            nn.Sigmoid(),
        )
        self.net.apply(init_weights)
        self.net[-2].apply(init_output_layer)

    def forward(self, images: Tensor) -> Tensor:
        """images (B,4,H,W) -> background (B,3,H,W)."""
        return self.net(images[:, :3] * (1 - images[:, 3:4]))
