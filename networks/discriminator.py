"""Critics for the adversarial loss on novel views (model-training.md §4.10)."""

from __future__ import annotations

from torch import Tensor, nn

from networks.blocks import init_output_layer, init_weights


class Discriminator(nn.Module):
    """WGAN critic: 14 bias-free convs with LeakyReLU(0.2), total stride 64, spatial mean of the last map.

    No normalisation layer, so real and fake batches can go through it concatenated.

    Args:
        in_channels: 4 (RGB + mask, ``--unmask 2``) or 3.
        nf: base width (16: widths 16, 32, 48, 64).
    """

    def __init__(self, in_channels: int = 4, nf: int = 16):
        super().__init__()
        # (in, out, kernel, stride); stride 2 halves the size: 128x128 -> 2x2 for CUB.
        spec = [
            (in_channels, nf, 1, 1),
            (nf, nf, 3, 1), (nf, 2 * nf, 3, 2),
            (2 * nf, 2 * nf, 3, 1), (2 * nf, 3 * nf, 3, 2),
            (3 * nf, 3 * nf, 3, 1), (3 * nf, 4 * nf, 3, 2),
            (4 * nf, 4 * nf, 3, 1), (4 * nf, 4 * nf, 3, 2),
            (4 * nf, 4 * nf, 3, 1), (4 * nf, 4 * nf, 3, 2),
            (4 * nf, 4 * nf, 3, 1), (4 * nf, 3 * nf, 3, 2),
            (3 * nf, 2 * nf, 1, 1),
        ]
        layers: list[nn.Module] = []
        for c_in, c_out, k, s in spec:
            layers += [nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(2 * nf, 1, 1, bias=False))
        self.net = nn.Sequential(*layers)
        self.net.apply(init_weights)
        self.net[-1].apply(init_output_layer)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> scores (B, 1), higher = more real."""
        return self.net(images).mean(dim=(2, 3))


class MultiScaleDiscriminator(nn.Module):
    """LSGAN critic at 3 scales; the input is average-pooled (3x3, stride 2) between scales.

    Args:
        in_channels: 4 or 3.
        nf: base width of each scale's conv stack (with bias).
        num_scales: number of scales.
    """

    def __init__(self, in_channels: int = 4, nf: int = 32, num_scales: int = 3):
        super().__init__()
        self.scales = nn.ModuleList(self._stack(in_channels, nf) for _ in range(num_scales))
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    @staticmethod
    def _stack(in_channels: int, nf: int) -> nn.Sequential:
        half = nf // 2
        spec = [
            (in_channels, half, 1, 1), (half, half, 3, 1),
            (half, nf, 3, 2), (nf, nf, 3, 1),        # H -> H/2
            (nf, nf, 3, 2), (nf, nf, 3, 1),          # H/2 -> H/4
            (nf, 2 * nf, 3, 2),                      # H/4 -> H/8
            (2 * nf, 2 * nf, 1, 1),
        ]
        layers: list[nn.Module] = []
        for c_in, c_out, k, s in spec:
            layers += [nn.Conv2d(c_in, c_out, k, s, k // 2), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(2 * nf, 1, 1))
        stack = nn.Sequential(*layers)
        stack.apply(init_weights)
        stack[-1].apply(init_output_layer)
        return stack

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, C, H, W) -> one score map (B, 1, H/8, W/8), (B, 1, H/16, W/16), ... per scale."""
        outputs = []
        for i, stack in enumerate(self.scales):
            if i:
                images = self.downsample(images)
            outputs.append(stack(images))
        return outputs
