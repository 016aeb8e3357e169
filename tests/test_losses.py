"""Every loss term against a naive loop version (and hand-computed values where they are short)."""

import math

import pytest
import torch
from torch import nn

from networks import Attributes, Discriminator, MultiScaleDiscriminator, losses
from renderer.mesh import Template


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def template() -> Template:
    return Template.icosphere(subdivisions=1)  # 42 vertices, 80 faces, 120 edges


def loop_iou_loss(pred: torch.Tensor, target: torch.Tensor) -> float:
    ious = []
    for b in range(pred.shape[0]):
        inter = union = 0.0
        for p, t in zip(pred[b].flatten().tolist(), target[b].flatten().tolist(), strict=True):
            inter += p * t
            union += p + t - p * t
        ious.append(inter / (union + 1e-10))
    return 1 - sum(ious) / len(ious)


def loop_nearest_resize(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Nearest resize (PyTorch's legacy 'nearest': source index floor(i * in / out))."""
    out = torch.empty(m.shape[0], h, w)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = m[:, math.floor(i * m.shape[1] / h), math.floor(j * m.shape[2] / w)]
    return out


def test_data_loss_matches_loops():
    b, h, w = 2, 8, 12
    pred_rgb, target_rgb = torch.rand(b, 3, h, w, generator=gen(0)), torch.rand(b, 3, h, w, generator=gen(1))
    pred_sil = torch.rand(b, 1, h, w, generator=gen(2))
    mask = (torch.rand(b, 1, h, w, generator=gen(3)) > 0.5).float()
    image, mask_term = losses.data_loss(pred_rgb, pred_sil, target_rgb, mask, contour_weight=0.3)

    total = 0.0
    for bi in range(b):
        for c in range(3):
            for i in range(h):
                for j in range(w):
                    m = mask[bi, 0, i, j].item()
                    p = pred_rgb[bi, c, i, j].item() * m + (1 - m)
                    g = target_rgb[bi, c, i, j].item() * m + (1 - m)
                    total += abs(p - g)
    assert image.item() == pytest.approx(total / (b * 3 * h * w), rel=1e-5)

    def contour(m):
        return (m - loop_nearest_resize(loop_nearest_resize(m, h // 4, w // 4), h, w)).abs()

    contour_term = (contour(pred_sil[:, 0]) - contour(mask[:, 0])).pow(2).mean().item()
    expected = loop_iou_loss(pred_sil[:, 0], mask[:, 0]) + 0.3 * contour_term
    assert mask_term.item() == pytest.approx(expected, rel=1e-5)
    # without the contour weight the mask term is the soft-IoU loss alone
    assert losses.data_loss(pred_rgb, pred_sil, target_rgb, mask)[1].item() == pytest.approx(
        loop_iou_loss(pred_sil[:, 0], mask[:, 0]), rel=1e-5)


def test_data_loss_ignores_the_prediction_outside_the_mask():
    rgb = torch.rand(1, 3, 4, 4, generator=gen(0))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    other = rgb.clone()
    other[..., 2:, :] = 0.0  # change only outside the mask
    sil = mask.clone()
    assert losses.data_loss(other, sil, rgb, mask)[0].item() == 0.0
    assert losses.data_loss(rgb, sil, rgb, mask)[1].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(B,1,H,W\)"):
        losses.data_loss(rgb, sil[:, 0], rgb, mask)


def test_laplacian_loss_matches_a_loop(template):
    delta = torch.randn(2, 42, 3, generator=gen(0))
    neighbours = {v: set() for v in range(42)}
    for a, b in template.edges.tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)
    total = 0.0
    for bi in range(2):
        for v in range(42):
            mean = sum(delta[bi, u] for u in neighbours[v]) / len(neighbours[v])
            total += (mean - delta[bi, v]).pow(2).sum().item()
    assert losses.laplacian_loss(delta, template.laplacian).item() == pytest.approx(total / 2, rel=1e-5)


def test_flatness_loss_matches_a_loop_and_is_zero_on_a_plane(template):
    normals = nn.functional.normalize(torch.randn(2, 80, 3, generator=gen(0)), dim=-1)
    total = 0.0
    for bi in range(2):
        for f1, f2 in template.edge_faces.tolist():
            total += (torch.dot(normals[bi, f1], normals[bi, f2]).item() - 1) ** 2
    assert losses.flatness_loss(normals, template.edge_faces).item() == pytest.approx(total / 2, rel=1e-5)
    flat = torch.tensor([0.0, 0.0, 1.0]).expand(2, 80, 3)
    assert losses.flatness_loss(flat, template.edge_faces).item() == 0.0


def test_edge_length_loss_matches_a_loop(template):
    verts = torch.randn(2, 42, 3, generator=gen(0))
    expected = 0.0
    for bi in range(2):
        lengths = [(verts[bi, a] - verts[bi, b]).norm().item() for a, b in template.edges.tolist()]
        mean = sum(lengths) / len(lengths)
        expected += math.sqrt(sum((le - mean) ** 2 for le in lengths))
    assert losses.edge_length_loss(verts, template.edges).item() == pytest.approx(0.1 * expected / 2, rel=1e-5)


def test_deform_and_depth_losses_match_loops():
    verts = torch.randn(2, 5, 3, generator=gen(0))
    norms = [verts[b, v].norm().item() for b in range(2) for v in range(5)]
    assert losses.deform_loss(verts).item() == pytest.approx(sum(norms) / 10, rel=1e-6)
    depths = [verts[b, v, 2].item() ** 2 for b in range(2) for v in range(5)]
    assert losses.depth_loss(verts).item() == pytest.approx(sum(depths) / 10, rel=1e-6)


@pytest.mark.parametrize("kind", ["exp", "quadratic"])
def test_depth_weighted_loss_matches_a_loop_and_only_moves_z(kind):
    verts = torch.randn(2, 6, 3, generator=gen(0)).requires_grad_(True)
    sign_init = torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0, 0.0])
    ratio, temperature = 2.0, 1.5
    total = 0.0
    for b in range(2):
        for v in range(6):
            x, y, z = verts[b, v].tolist()
            target = 0.001 if sign_init[v] >= 0 else -0.001
            r2 = x * x + (y / ratio) ** 2
            weight = math.exp(temperature * r2) if kind == "exp" else r2
            total += (z - target) ** 2 * weight
    loss = losses.depth_weighted_loss(verts, sign_init, ratio, kind, temperature)
    assert loss.item() == pytest.approx(total / 12, rel=1e-5)
    loss.backward()
    assert torch.all(verts.grad[..., :2] == 0) and torch.any(verts.grad[..., 2] != 0)
    with pytest.raises(ValueError, match="kind"):
        losses.depth_weighted_loss(verts, sign_init, ratio, "cubic")


@pytest.mark.parametrize("l1", [False, True])
def test_flip_loss_matches_a_loop(template, l1):
    delta = torch.randn(2, 42, 3, generator=gen(0)) * 0.1
    flip, sign = template.flip_index, template.sign_init
    total = 0.0
    for b in range(2):
        for v in range(42):
            u = flip[v].item()
            partner = delta[b, u] * torch.tensor([1.0, 1.0, -1.0])
            z_sign = (delta[b, u, 2] > 0).float() - (delta[b, u, 2] < 0).float()
            weight = max(0.0, (z_sign * sign[u]).item())
            diff = delta[b, v] - partner
            total += weight * (diff.abs().sum().item() if l1 else diff.norm().item())
    count = 2 * 42 * (3 if l1 else 1)
    assert losses.flip_loss(delta, flip, sign, l1=l1).item() == pytest.approx(total / count, rel=1e-5)


def test_flip_loss_is_zero_for_mirror_symmetric_offsets(template):
    delta = torch.randn(1, 42, 3, generator=gen(1))
    symmetric = (delta + delta[:, template.flip_index] * torch.tensor([1.0, 1.0, -1.0])) / 2
    assert losses.flip_loss(symmetric, template.flip_index, template.sign_init).item() == pytest.approx(0, abs=1e-7)


def loop_chamfer(x: torch.Tensor, y: torch.Tensor) -> float:
    total = 0.0
    for b in range(x.shape[0]):
        xy = sum(min(((p - q) ** 2).sum().item() for q in y[b]) for p in x[b]) / x.shape[1]
        yx = sum(min(((p - q) ** 2).sum().item() for q in x[b]) for p in y[b]) / y.shape[1]
        total += xy + yx
    return total / x.shape[0]


def test_chamfer_distance_hand_value_and_loop():
    x = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    y = torch.tensor([[[0.0, 0.0, 0.5]]])
    # x -> y: (0.25 + 1.25) / 2; y -> x: 0.25
    assert losses.chamfer_distance(x, y).item() == pytest.approx(0.75 + 0.25)
    a, b = torch.randn(3, 7, 3, generator=gen(0)), torch.randn(3, 5, 3, generator=gen(1))
    assert losses.chamfer_distance(a, b).item() == pytest.approx(loop_chamfer(a, b), rel=1e-5)
    per_sample = losses.chamfer_distance(a, b, per_sample=True)
    assert per_sample.shape == (3,)
    assert per_sample[1].item() == pytest.approx(loop_chamfer(a[1:2], b[1:2]), rel=1e-5)


def test_chamfer_gradient_moves_points_toward_their_nearest_neighbours():
    x = torch.tensor([[[0.0, 0.0, 0.0]]], requires_grad=True)
    y = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    losses.chamfer_distance(x, y).backward()
    # d/dx [ |x - y0|^2 + (|y0 - x|^2 + |y1 - x|^2) / 2 ] = -2 y0 - (y0 + y1)
    assert torch.allclose(x.grad, torch.tensor([[[-3.0, -3.0, 0.0]]]))


def cycle_attributes(seed: int) -> Attributes:
    g = gen(seed)
    b = 2
    return Attributes(azimuth_deg=torch.rand(b, generator=g) * 360 - 180, elevation_deg=torch.rand(b, generator=g) * 30,
                      distance=torch.rand(b, generator=g) * 5 + 2, offset=torch.rand(b, 2, generator=g) - 0.5,
                      verts=torch.randn(b, 6, 3, generator=g), delta_verts=torch.randn(b, 6, 3, generator=g),
                      texture=torch.rand(b, 3, 4, 2, generator=g), light=torch.randn(b, 9, generator=g),
                      background=torch.rand(b, 3, 2, 2, generator=g))


@pytest.mark.parametrize("l1", [False, True])
@pytest.mark.parametrize("chamfer", [True, False])
def test_attribute_cycle_loss_matches_a_loop(l1, chamfer):
    pred, target = cycle_attributes(0), cycle_attributes(1)

    def d(a, b):
        values = [abs(p - q) if l1 else (p - q) ** 2 for p, q in
                  zip(a.flatten().tolist(), b.flatten().tolist(), strict=True)]
        return sum(values) / len(values)

    def ang(deg):
        return torch.tensor([[math.cos(math.radians(v)), math.sin(math.radians(v))] for v in deg.tolist()])

    camera = (2.0 * d(ang(pred.azimuth_deg), ang(target.azimuth_deg))
              + d(ang(pred.elevation_deg), ang(target.elevation_deg)) + d(pred.distance, target.distance))
    shape = loop_chamfer(pred.verts, target.verts) if chamfer else d(pred.verts, target.verts)
    expected = (camera + shape + d(pred.texture, target.texture) + 0.1 * d(pred.light, target.light)
                + d(pred.offset, target.offset))
    loss = losses.attribute_cycle_loss(pred, target, azim_weight=2.0, l1=l1, chamfer=chamfer)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_attribute_cycle_loss_ignores_background_and_detaches_the_target():
    pred, target = cycle_attributes(0), cycle_attributes(1)
    target.light.requires_grad_(True)
    other_bg = Attributes(**{**target.__dict__, "background": torch.zeros(2, 3, 2, 2)})
    a = losses.attribute_cycle_loss(pred, target)
    assert a.item() == losses.attribute_cycle_loss(pred, other_bg).item()
    assert not a.requires_grad
    # azimuths 360 degrees apart are the same angle
    turned = Attributes(**{**pred.__dict__, "azimuth_deg": pred.azimuth_deg + 360})
    assert losses.attribute_cycle_loss(turned, pred).item() == pytest.approx(0.0, abs=1e-6)


def test_azimuth_spread_loss_matches_a_loop_and_its_extremes():
    azimuths = torch.rand(7, generator=gen(3)) * 360 - 180

    def loop(harmonics):
        total = 0.0
        for k in range(1, harmonics + 1):
            c = sum(math.cos(math.radians(k * a)) for a in azimuths.tolist()) / len(azimuths)
            s = sum(math.sin(math.radians(k * a)) for a in azimuths.tolist()) / len(azimuths)
            total += c * c + s * s
        return total

    for harmonics in (1, 2, 3):
        assert losses.azimuth_spread_loss(azimuths, harmonics).item() == pytest.approx(loop(harmonics), rel=1e-5)
    assert losses.azimuth_spread_loss(torch.full((5,), 30.0)).item() == pytest.approx(2.0)  # collapsed
    assert losses.azimuth_spread_loss(torch.arange(8.0) * 45).item() == pytest.approx(0.0, abs=1e-12)  # even
    # two opposite views cancel the first harmonic only
    assert losses.azimuth_spread_loss(torch.tensor([10.0, 190.0])).item() == pytest.approx(1.0)


class LinearCritic(nn.Module):
    """D(x) = <w, x> per sample: its input gradient is w everywhere."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(dim=1, keepdim=True)


def test_gradient_penalty_of_a_linear_critic_is_hand_computable():
    w = torch.zeros(1, 2, 2, 2)
    w[0, 0, 0, 0], w[0, 1, 1, 1] = 3.0, 4.0  # |w| = 5
    critic = LinearCritic(w)
    real, fake = torch.rand(4, 2, 2, 2, generator=gen(0)), torch.rand(4, 2, 2, 2, generator=gen(1))
    gp = losses.gradient_penalty(critic, real, fake, generator=gen(2))
    assert gp.item() == pytest.approx(16.0)  # (5 - 1)^2
    gp.backward()  # differentiable w.r.t. the critic: d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w|
    assert torch.allclose(critic.w.grad, 2 * 4 * w / 5)


def test_gradient_penalty_matches_a_per_sample_loop():
    critic = Discriminator(4, nf=4)
    real, fake = torch.rand(3, 4, 64, 64, generator=gen(0)), torch.rand(3, 4, 64, 64, generator=gen(1))
    gp = losses.gradient_penalty(critic, real, fake, generator=gen(5))
    alpha = torch.rand(3, 1, 1, 1, generator=gen(5))  # the same draws
    total = 0.0
    for b in range(3):
        x = (alpha[b] * real[b] + (1 - alpha[b]) * fake[b]).unsqueeze(0).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(x).sum(), x)
        total += (grad.norm().item() - 1) ** 2
    assert gp.item() == pytest.approx(total / 3, rel=1e-4)


def test_gradient_penalty_sums_over_the_scales_of_a_multi_scale_critic():
    critic = MultiScaleDiscriminator(3, nf=8)
    real, fake = torch.rand(2, 3, 32, 32, generator=gen(0)), torch.rand(2, 3, 32, 32, generator=gen(1))
    gp = losses.gradient_penalty(critic, real, fake, generator=gen(3))
    alpha = torch.rand(2, 1, 1, 1, generator=gen(3))  # the same draws
    x = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    expected = 0.0
    for out in critic(x):
        (grad,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
        expected += sum((grad[b].norm().item() - 1) ** 2 for b in range(2)) / 2
    assert gp.item() == pytest.approx(expected, rel=1e-4)


def test_adversarial_losses_hand_values():
    real, fake = torch.tensor([[1.0], [3.0]]), torch.tensor([[-2.0], [0.0]])
    assert losses.wgan_critic_loss(real, fake).item() == -1.0 - 2.0
    assert losses.wgan_generator_loss(fake).item() == 1.0
    real_maps = [torch.full((2, 1, 2, 2), 1.0), torch.full((2, 1, 1, 1), 3.0)]
    fake_maps = [torch.full((2, 1, 2, 2), 0.5), torch.zeros(2, 1, 1, 1)]
    assert losses.lsgan_critic_loss(real_maps, fake_maps).item() == pytest.approx(0 + 0.25 + 4 + 0)
    assert losses.lsgan_generator_loss(fake_maps).item() == pytest.approx(0.25 + 1)
