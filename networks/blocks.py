"""Building blocks of the encoders (model-training.md §4.1-§4.3).

Every block is an ``nn.Module`` mapping tensors to tensors. Shape comments use C for channels and
H x W for the spatial size of the block's input.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("bn", "in", "none")

# ImageNet statistics for RGB; the mask channel m in {0, 1} is only centred (m - 0.5).
_MEAN_4C = (0.485, 0.456, 0.406, 0.5)
_STD_4C = (0.229, 0.224, 0.225, 1.0)


def normalize_4c(images: Tensor) -> Tensor:
    """Normalise an RGB + mask batch the way every encoder except the background one expects.

    Args:
        images: (B, 4, H, W) RGB in [0, 1] and a binary mask.

    Returns:
        (B, 4, H, W): RGB standardised with the ImageNet mean/std, mask mapped to [-0.5, 0.5].
    """
    mean, std = _normalisation(images.dtype, images.device)
    return (images - mean) / std


@functools.lru_cache(maxsize=8)
def _normalisation(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    # Built once per dtype and device: a tensor made from Python numbers on a GPU is a blocking
    # host-to-device copy on every call, and could not be captured in a CUDA graph.
    mean = torch.tensor(_MEAN_4C, dtype=dtype, device=device).view(1, 4, 1, 1)
    std = torch.tensor(_STD_4C, dtype=dtype, device=device).view(1, 4, 1, 1)
    return mean, std


def init_weights(module: nn.Module) -> None:
    """The original's default initialisation, applied per module with ``net.apply(init_weights)``.

    Conv and linear weights: Kaiming normal (fan-in, gain for ReLU); batch/instance-norm scales:
    N(1, 0.02); every bias: 0.
    """
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, a=0.0, mode="fan_in")
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)) and module.weight is not None:
        nn.init.normal_(module.weight, 1.0, 0.02)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)):
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def init_output_layer(module: nn.Module) -> None:
    """Initialisation of output layers: weights N(0, 1e-5), bias 0, so every head starts near 0."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 1e-5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class AddCoords2d(nn.Module):
    """Append two coordinate channels in [-1, 1]: the row (2h/(H-1) - 1), then the column."""

    def forward(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,C+2,H,W)
        b, _, h, w = x.shape
        rows = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
        cols = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
        return torch.cat([x, rows, cols], dim=1)


class Conv2dBlock(nn.Module):
    """[coordinates] -> Conv2d -> [norm] -> [activation].

    Args:
        norm: 'bn' (BatchNorm2d, and then the conv has no bias), 'in' (InstanceNorm2d, no affine) or 'none'.
        activation: 'lrelu' (LeakyReLU 0.2), 'relu' or 'none'.
        coordconv: append two coordinate channels before the convolution (:class:`AddCoords2d`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 norm: str = "none", activation: str = "lrelu", padding_mode: str = "zeros",
                 coordconv: bool = False):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
        self.coords = AddCoords2d() if coordconv else None
        self.conv = nn.Conv2d(in_channels + (2 if coordconv else 0), out_channels, kernel_size, stride, padding,
                              padding_mode=padding_mode, bias=norm != "bn")
        self.norm = {"bn": nn.BatchNorm2d(out_channels), "in": nn.InstanceNorm2d(out_channels),
                     "none": None}[norm]
        activations = {"lrelu": nn.LeakyReLU(0.2), "relu": nn.ReLU(), "none": None}
        if activation not in activations:
            raise ValueError(f"unknown activation {activation!r}; choose one of {tuple(activations)}")
        self.activation = activations[activation]

    def forward(self, x: Tensor) -> Tensor:
        if self.coords is not None:
            x = self.coords(x)
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation gate: sigmoid(conv1x1(relu(conv1x1(global average)))), (B,C,1,1)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = channels // reduction
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),                   # (B,C,H,W) -> (B,C,1,1)
            nn.Conv2d(channels, hidden, 1),            # C -> C/16
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),            # C/16 -> C
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(x)


class ResBlock(nn.Module):
    """Two 3x3 convs d -> d/2 -> d; output ``0.2 x + F(x)`` (spec §4.2). Shape preserved."""

    def __init__(self, channels: int, norm: str = "bn"):
        super().__init__()
        self.body = nn.Sequential(
            Conv2dBlock(channels, channels // 2, 3, 1, 1, norm=norm),                       # d -> d/2
            Conv2dBlock(channels // 2, channels, 3, 1, 1, norm=norm, activation="none"),    # d/2 -> d
        )

    def forward(self, x: Tensor) -> Tensor:
        return 0.2 * x + self.body(x)


class ResBlocks(nn.Module):
    """``n`` ResBlocks whose output is gated by channel attention and added to the input."""

    def __init__(self, num_blocks: int, channels: int, norm: str = "bn"):
        super().__init__()
        self.blocks = nn.Sequential(*(ResBlock(channels, norm) for _ in range(num_blocks)))
        self.attention = ChannelAttention(channels)

    def forward(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,C,H,W)
        out = self.blocks(x)
        return x + self.attention(out) * out


class ResBlockHalf(nn.Module):
    """Halve the resolution and double the channels: [conv path, 3x3 average pool of the input]."""

    def __init__(self, channels: int, norm: str = "bn"):
        super().__init__()
        self.body = nn.Sequential(
            Conv2dBlock(channels, channels, 3, 2, 1, norm=norm),                      # H x W -> H/2 x W/2
            Conv2dBlock(channels, channels, 3, 1, 1, norm=norm, activation="none"),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,2C,H/2,W/2)
        shortcut = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1)
        return torch.cat([self.body(x), shortcut], dim=1)


class MMPool(nn.Module):
    """Learned blend of adaptive max and average pooling: ``s·max + (1 − s)·avg``, s = sigmoid(p), p0 = 0."""

    def __init__(self, output_size: tuple[int, int] = (1, 1)):
        super().__init__()
        self.output_size = output_size
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,C,*output_size)
        weight = torch.sigmoid(self.p)
        return (weight * F.adaptive_max_pool2d(x, self.output_size)
                + (1 - weight) * F.adaptive_avg_pool2d(x, self.output_size))


class ASPP(nn.Module):
    """Atrous spatial pyramid: dilations 1, 2, 4, 8 (reflect padding), gated residual ``x + f·ca(f)``.

    Reflect padding by 8 needs inputs larger than 8 pixels in both directions.
    """

    def __init__(self, channels: int):
        super().__init__()
        quarter = channels // 4
        widths = (quarter, quarter, quarter, channels - 3 * quarter)
        self.branches = nn.ModuleList(
            nn.Conv2d(channels, width, 3, 1, padding=dilation, dilation=dilation, padding_mode="reflect")
            for width, dilation in zip(widths, (1, 2, 4, 8), strict=True)
        )
        self.attention = ChannelAttention(channels)

    def forward(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,C,H,W)
        f = torch.cat([branch(x) for branch in self.branches], dim=1)
        return x + f * self.attention(f)


def _upsample2(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class BiFPN(nn.Module):
    """Bidirectional fusion of a 4-level pyramid with 64/128/256/512 channels at strides 4/8/16/32.

    Top-down: ``t4 = up(x5) + 0.2 x4``, ``t3 = up(t4) + 0.2 x3``, ``t2 = up(t3) + 0.2 x2``. With
    ``bottom_up`` a second pass goes back down and all four levels are returned as (x2, x3, x4, x5)
    again; without it only ``t2`` (64 channels, stride 4) is returned.
    """

    CHANNELS = (64, 128, 256, 512)

    def __init__(self, bottom_up: bool):
        super().__init__()
        c2, c3, c4, c5 = self.CHANNELS
        self.bottom_up = bottom_up
        self.top5 = Conv2dBlock(c5, c4, 3, 1, 1, norm="bn")  # 512 -> 256 at stride 32, then x2
        self.top4 = Conv2dBlock(c4, c3, 3, 1, 1, norm="bn")  # 256 -> 128 at stride 16, then x2
        self.top3 = Conv2dBlock(c3, c2, 3, 1, 1, norm="bn")  # 128 -> 64 at stride 8, then x2
        if bottom_up:
            self.lateral2 = Conv2dBlock(c2, c2, 3, 1, 1, norm="bn")  # 64 -> 64 at stride 4
            self.down2 = Conv2dBlock(c2, c3, 3, 2, 1, norm="bn")     # stride 4 -> 8, 64 -> 128
            self.down3 = Conv2dBlock(c3, c4, 3, 2, 1, norm="bn")     # stride 8 -> 16, 128 -> 256
            self.down4 = Conv2dBlock(c4, c5, 3, 2, 1, norm="bn")     # stride 16 -> 32, 256 -> 512

    def forward(self, x2: Tensor, x3: Tensor, x4: Tensor, x5: Tensor) -> Tensor | tuple[Tensor, ...]:
        t4 = _upsample2(self.top5(x5)) + 0.2 * x4
        t3 = _upsample2(self.top4(t4)) + 0.2 * x3
        t2 = _upsample2(self.top3(t3)) + 0.2 * x2
        if not self.bottom_up:
            return t2
        b2 = x2 + 0.2 * self.lateral2(t2)
        b3 = x3 + 0.2 * t3 + 0.2 * self.down2(b2)
        b4 = x4 + 0.2 * t4 + 0.2 * self.down3(b3)
        b5 = x5 + 0.2 * self.down4(b4)
        return b2, b3, b4, b5


class TextureBiFPN(nn.Module):
    """Texture-flow decoder: three BiFPNs, then two (conv + ASPP + x2) stages and a 5x5 output conv.

    Input: the pyramid (x2, x3, x4, x5) of a (B,4,H,W) image, with 64/128/256/512 channels at
    strides 4/8/16/32. Output: (B,2,H,W) flow in [-1, 1] (Hardtanh), about 0 at initialisation.
    """

    def __init__(self, droprate: float = 0.0):
        super().__init__()
        self.fuse = nn.ModuleList([BiFPN(bottom_up=True), BiFPN(bottom_up=True), BiFPN(bottom_up=False)])
        self.up_half = nn.Sequential(
            Conv2dBlock(64, 32, 3, 1, 1, norm="bn"),   # stride 4: 64 -> 32
            ASPP(32),
            nn.Upsample(scale_factor=2.0, mode="nearest"),  # stride 4 -> 2
        )
        self.up_full = nn.Sequential(
            Conv2dBlock(32, 16, 3, 1, 1, norm="bn"),   # stride 2: 32 -> 16
            ASPP(16),
            nn.Upsample(scale_factor=2.0, mode="nearest"),  # stride 2 -> 1
        )
        head = [nn.Dropout(droprate / 2)] if droprate > 0 else []
        head += [Conv2dBlock(16, 2, 5, 1, 2, norm="none", activation="none", padding_mode="reflect"),  # 16 -> 2
                 nn.Hardtanh()]
        self.head = nn.Sequential(*head)
        self.fuse.apply(init_weights)
        self.up_half.apply(init_weights)
        self.up_full.apply(init_weights)
        self.head.apply(init_output_layer)

    def forward(self, x2: Tensor, x3: Tensor, x4: Tensor, x5: Tensor) -> Tensor:
        levels = (x2, x3, x4, x5)
        for fuse in self.fuse[:-1]:
            levels = fuse(*levels)
        t2 = self.fuse[-1](*levels)                    # (B,64,H/4,W/4)
        return self.head(self.up_full(self.up_half(t2)))  # (B,2,H,W)
