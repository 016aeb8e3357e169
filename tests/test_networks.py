"""Encoders, blocks, critics and the Attributes dataclass: shapes, hand-checked values, freezing."""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from networks import (
    BACKBONES,
    FROZEN_BY_MODE,
    AttributeEncoder,
    Attributes,
    BackgroundEncoder,
    CameraEncoder,
    Discriminator,
    LightEncoder,
    MultiScaleDiscriminator,
    ShapeEncoder,
    TextureEncoder,
    mode_for_iteration,
)
from networks.blocks import (
    ASPP,
    AddCoords2d,
    BiFPN,
    Conv2dBlock,
    MMPool,
    ResBlock,
    ResBlockHalf,
    ResBlocks,
    TextureBiFPN,
    normalize_4c,
)
from networks.encoders import (
    Base4C,
    HRNet4C,
    ResNet4C,
    azimuth_from_xy,
    neighbour_difference,
    sample_template_features,
)
from renderer.mesh import Template


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 4, h, w, generator=g)
    x[:, 3] = (x[:, 3] > 0.5).float()
    return x


@pytest.fixture(scope="module")
def small_template() -> Template:
    return Template.icosphere(subdivisions=1)  # 42 vertices: keeps the shape head small


# ---------------------------------------------------------------------------------------- blocks


def test_normalize_4c_maps_imagenet_mean_to_zero_and_centres_the_mask():
    x = torch.tensor([0.485, 0.456, 0.406, 1.0]).view(1, 4, 1, 1).repeat(1, 1, 2, 2)
    x[0, 3, 0, 0] = 0.0
    y = normalize_4c(x)
    assert torch.allclose(y[0, :3], torch.zeros(3, 2, 2), atol=1e-6)
    assert y[0, 3, 0, 0] == -0.5 and y[0, 3, 1, 1] == 0.5
    rgb_one = normalize_4c(torch.ones(1, 4, 1, 1))[0, :3, 0, 0]
    assert torch.allclose(rgb_one, torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))


def test_add_coords_appends_row_then_column_in_minus_one_one():
    y = AddCoords2d()(torch.zeros(1, 1, 3, 2))
    assert y.shape == (1, 3, 3, 2)
    assert torch.equal(y[0, 1], torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(y[0, 2], torch.tensor([[-1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0]]))


def test_conv2d_block_has_bias_only_without_batchnorm_and_rejects_unknown_norm():
    assert Conv2dBlock(3, 8, 3, norm="bn").conv.bias is None
    assert Conv2dBlock(3, 8, 3, norm="none").conv.bias is not None
    block = Conv2dBlock(3, 8, 5, 2, 2, norm="in", coordconv=True)
    assert block.conv.in_channels == 5
    assert block(torch.rand(2, 3, 16, 12)).shape == (2, 8, 8, 6)
    with pytest.raises(ValueError, match="unknown norm"):
        Conv2dBlock(3, 8, 3, norm="ln")


def test_resblock_is_point_two_identity_when_its_body_outputs_zero():
    block = ResBlock(8).eval()
    nn.init.zeros_(block.body[1].conv.weight)  # last conv -> 0, BN(eval, fresh stats) of 0 is 0
    nn.init.zeros_(block.body[1].norm.bias)
    x = torch.randn(2, 8, 5, 4)
    assert torch.allclose(block(x), 0.2 * x)


def test_resblocks_gate_is_identity_plus_gated_body_and_keeps_shape():
    blocks = ResBlocks(2, 32).eval()
    x = torch.randn(2, 32, 6, 5)
    out = blocks(x)
    body = blocks.blocks(x)
    assert out.shape == x.shape
    assert torch.allclose(out, x + blocks.attention(body) * body)
    assert blocks.attention(body).shape == (2, 32, 1, 1)


def test_resblock_half_halves_size_and_keeps_the_average_pooled_input():
    x = torch.randn(2, 8, 16, 12)
    y = ResBlockHalf(8)(x)
    assert y.shape == (2, 16, 8, 6)
    assert torch.allclose(y[:, 8:], F.avg_pool2d(x, 3, 2, 1))


def test_mmpool_starts_as_the_mean_of_max_and_average():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]]).view(1, 1, 2, 2)
    assert torch.allclose(MMPool()(x), torch.tensor(4.5))  # 0.5 * 6 + 0.5 * 3
    local = torch.arange(6.0).view(1, 1, 6, 1)  # 6 "vertices", one column
    pooled = MMPool((2, 2))(local)
    # rows pool vertices 0-2 and 3-5, the single column is repeated
    assert torch.allclose(pooled[0, 0], torch.tensor([[1.5, 1.5], [4.5, 4.5]]))


def test_aspp_keeps_shape():
    assert ASPP(16)(torch.randn(2, 16, 10, 9)).shape == (2, 16, 10, 9)


def pyramid(b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(b, c, h // s, w // s) for c, s in zip((64, 128, 256, 512), (4, 8, 16, 32), strict=True))


def test_bifpn_returns_all_levels_or_the_finest():
    levels = pyramid(2, 64, 96)
    out = BiFPN(bottom_up=True)(*levels)
    assert [o.shape for o in out] == [x.shape for x in levels]
    assert BiFPN(bottom_up=False)(*levels).shape == levels[0].shape


def test_texture_bifpn_flow_is_full_resolution_bounded_and_near_zero_at_init():
    flow = TextureBiFPN(droprate=0.2)(*pyramid(2, 64, 96))
    assert flow.shape == (2, 2, 64, 96)
    assert flow.abs().max() < 1e-2


# ---------------------------------------------------------------------------------------- encoders


def test_base4c_has_stride_16_and_288_channels():
    assert Base4C()(torch.randn(2, 4, 64, 32)).shape == (2, 288, 4, 2)


def test_resnet_trunk_strides_and_four_channel_stem():
    net = ResNet4C("res18", last_stride=2)
    x2, x3, x4, x5 = net.pyramid(torch.randn(1, 4, 64, 32))
    assert [t.shape[1:] for t in (x2, x3, x4, x5)] == [(64, 16, 8), (128, 8, 4), (256, 4, 2), (512, 2, 1)]
    stem = net.stem[0].weight
    assert stem.shape == (64, 4, 7, 7) and torch.allclose(stem[:, 3], stem[:, :3].mean(dim=1))
    assert ResNet4C("res18", last_stride=1)(torch.randn(1, 4, 64, 32)).shape == (1, 512, 4, 2)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_feeds_the_camera_and_shape_heads(small_template, backbone):
    if backbone == "hr18sv2":
        pytest.importorskip("timm")
    x = images(2, 64, 96)
    camera = CameraEncoder(backbone=backbone).eval()
    assert [tuple(t.shape) for t in camera(x, small_template.verts)] == [(2,), (2,), (2,), (2, 2)]
    shape = ShapeEncoder(42, backbone=backbone).eval()
    assert shape(x, small_template.verts, small_template.laplacian).shape == (2, 42, 3)
    with pytest.raises(ValueError, match="unknown camera/shape backbone"):
        CameraEncoder(backbone="vgg")


def test_sample_template_features_uses_raw_xy_with_image_y_down():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)  # row 0 is the image top
    verts = torch.tensor([[-0.5, -0.5, 0.3], [0.5, 0.5, -0.2], [0.0, 0.0, 0.0]])
    # align_corners=False: (+-0.5, +-0.5) are the pixel centres; mesh y = +0.5 reads image row 1 (bottom)
    out = sample_template_features(features, verts, align_corners=False)
    assert out.shape == (1, 1, 3, 1)
    assert torch.allclose(out[0, 0, :, 0], torch.tensor([1.0, 4.0, 2.5]))
    # align_corners=True: (+-1) are the pixel centres, so (-0.5, -0.5) is a quarter of the way in
    out = sample_template_features(features, verts, align_corners=True)
    assert torch.allclose(out[0, 0, 0, 0], torch.tensor(0.75 * 0.75 * 1 + 0.75 * 0.25 * 2 + 0.25 * 0.75 * 3
                                                          + 0.25 * 0.25 * 4))


def test_neighbour_difference_matches_a_loop_over_neighbours():
    # square pyramid: apex 0 (degree 4), base 1-4 (degree 3): a non-symmetric Laplacian
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 1], [1, 3, 2], [1, 4, 3]])
    neighbours = {v: set() for v in range(5)}
    for f in faces.tolist():
        for a in f:
            neighbours[a].update(set(f) - {a})
    lap = torch.zeros(5, 5)
    for i, nb in neighbours.items():
        lap[i, i] = -1
        for j in nb:
            lap[i, j] = 1 / len(nb)
    local = torch.randn(2, 3, 5)
    expected = torch.zeros_like(local)
    for j in range(5):
        expected[..., j] = sum(local[..., i] / len(neighbours[i]) for i in neighbours[j]) - local[..., j]
    assert torch.allclose(neighbour_difference(local, lap), expected, atol=1e-6)


def test_azimuth_from_xy_known_values():
    x = torch.tensor([0.0, 1.0, -1.0, 0.0])
    y = torch.tensor([1.0, 0.0, 1e-4, -2.0])
    az = azimuth_from_xy(x, y, 360.0)
    # the + 1e-6 in r keeps |x / r| < 1 (finite acos gradient) at the price of <= 0.081 degrees
    assert torch.allclose(az, torch.tensor([-90.0, 0.0, -180.0, 90.0]), atol=0.09)
    assert torch.allclose(azimuth_from_xy(x[:1], y[:1], 180.0), torch.tensor([-45.0]), atol=0.01)


def test_camera_encoder_heads_respect_the_ranges(small_template):
    enc = CameraEncoder(dist_range=(2.0, 6.0), elev_range=(-15.0, 15.0)).eval()
    x = images(2, 64, 64)
    az, el, dist, off = enc(x, small_template.verts)
    assert az.shape == el.shape == dist.shape == (2,) and off.shape == (2, 2)
    # initial heads output ~0: sigmoid 0.5 puts distance and elevation mid-range
    assert torch.allclose(dist, torch.full((2,), 4.0), atol=0.02)
    assert torch.allclose(el, torch.zeros(2), atol=0.1)
    with torch.no_grad():
        enc.dist_elev_head[-1].bias.copy_(torch.tensor([50.0, -50.0]))
        enc.offset_head[-1].bias.copy_(torch.tensor([50.0, -50.0]))
    _, el, dist, off = enc(x, small_template.verts)
    assert torch.allclose(dist, torch.full((2,), 6.0)) and torch.allclose(el, torch.full((2,), -15.0))
    assert torch.allclose(off, torch.tensor([[1.0, -1.0]] * 2))


def test_a_separate_elevation_head_gives_the_elevation_alone(small_template):
    enc = CameraEncoder(dist_range=(2.0, 6.0), elev_range=(-15.0, 15.0), separate_elevation_head=True).eval()
    assert not hasattr(enc, "dist_elev_head")
    assert enc.distance_head[-1].out_features == enc.elevation_head[-1].out_features == 1
    x = images(2, 64, 64)
    _, el, dist, _ = enc(x, small_template.verts)
    assert torch.allclose(dist, torch.full((2,), 4.0), atol=0.02) and torch.allclose(el, torch.zeros(2), atol=0.1)
    with torch.no_grad():
        enc.distance_head[-1].bias.fill_(50.0)
        enc.elevation_head[-1].bias.fill_(-50.0)
    _, el, dist, _ = enc(x, small_template.verts)
    assert torch.allclose(dist, torch.full((2,), 6.0)) and torch.allclose(el, torch.full((2,), -15.0))
    enc.train()
    el = enc(x, small_template.verts)[1]
    el.sum().backward()  # the elevation reaches the backbone and its own head, never the distance head
    assert all(p.grad is None for p in enc.distance_head.parameters())
    assert all(p.grad is not None for p in enc.elevation_head.parameters())


def test_camera_encoder_reads_the_template_it_is_given(small_template):
    enc = CameraEncoder().eval()
    with torch.no_grad():
        for head in (enc.dist_elev_head, enc.azimuth_head, enc.offset_head):
            head[-1].weight.normal_(0.0, 0.01)  # make the heads sensitive to their input
    x = images(2, 64, 64)
    moved = small_template.verts * torch.tensor([0.5, 0.5, 1.0])
    assert not torch.allclose(torch.cat(enc(x, small_template.verts)[3:]), torch.cat(enc(x, moved)[3:]))


def test_camera_encoder_without_local_features_has_half_the_head_inputs(small_template):
    enc = CameraEncoder(local_features=False).eval()
    assert enc.dist_elev_head[0].in_features == 4 * 288
    assert enc(images(2, 64, 64), small_template.verts)[3].shape == (2, 2)


@pytest.mark.parametrize("local_features", [True, False])
def test_shape_encoder_offsets_are_zero_mean_and_bounded(small_template, local_features):
    enc = ShapeEncoder(42, local_features=local_features)
    with torch.no_grad():
        enc.output.bias.normal_(0.0, 10.0)  # drive tanh into saturation
    delta = enc(images(2, 64, 64), small_template.verts, small_template.laplacian)
    assert delta.shape == (2, 42, 3)
    assert torch.allclose(delta.mean(dim=1), torch.zeros(2, 3), atol=1e-6)
    assert delta.abs().max() <= 1.0  # 0.5 tanh, minus a mean of magnitude <= 0.5
    with pytest.raises(ValueError, match="42 vertices"):
        enc(images(2, 64, 64), small_template.verts[:10], small_template.laplacian)


def test_texture_encoder_samples_the_image_where_the_flow_points():
    enc = TextureEncoder().eval()
    x = images(2, 96, 64)
    head = enc.decoder.head[0].conv
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([1.0, -1.0]))  # x = right edge, y = top edge
    tex = enc(x)
    assert tex.shape == (2, 3, 192, 64)
    # bicubic with align_corners=True at a pixel centre returns that pixel exactly
    expected = x[:, :3, 0, 63].view(2, 3, 1, 1).expand(2, 3, 192, 64)
    assert torch.allclose(tex, expected, atol=1e-5)


def test_texture_encoder_stacks_the_vertical_flip_below():
    tex = TextureEncoder(droprate=0.2).eval()(images(2, 64, 96))
    assert tex.shape == (2, 3, 128, 96)
    assert torch.equal(tex[:, :, 64:], tex[:, :, :64].flip(2))


def test_texture_encoder_rejects_sizes_it_cannot_decode():
    with pytest.raises(ValueError, match="multiples of 32"):
        TextureEncoder()(images(1, 64, 48))
    with pytest.raises(ValueError, match="unknown texture backbone"):
        TextureEncoder("res50")


def test_light_encoder_starts_at_ambient_three_and_saturates_inside_its_range():
    enc = LightEncoder().eval()
    light = enc(images(2, 64, 64))
    assert light.shape == (2, 9)
    assert torch.allclose(light, torch.tensor([3.0] + [0.0] * 8).expand(2, 9), atol=1e-3)
    with torch.no_grad():
        enc.head[-1].bias.copy_(torch.tensor([50.0] + [-50.0] * 8))
    assert torch.allclose(enc(images(2, 64, 64)), torch.tensor([3.5] + [-0.1] * 8).expand(2, 9))


def test_background_encoder_ignores_the_foreground():
    enc = BackgroundEncoder(droprate=0.2).eval()
    x = images(2, 64, 32)
    y = x.clone()
    y[:, :3] = torch.where(x[:, 3:4] > 0, torch.rand_like(x[:, :3]), x[:, :3])
    bg = enc(x)
    assert bg.shape == (2, 3, 64, 32) and 0 < bg.min() and bg.max() < 1
    assert torch.equal(bg, enc(y))


def test_critics_output_shapes():
    x = torch.randn(3, 4, 128, 64)
    assert Discriminator(4)(x).shape == (3, 1)
    assert Discriminator(3)(x[:, :3]).shape == (3, 1)
    maps = MultiScaleDiscriminator(4)(x)
    assert [m.shape for m in maps] == [(3, 1, 16, 8), (3, 1, 8, 4), (3, 1, 4, 2)]


# --------------------------------------------------------------------- parameter counts (spec §4.11)


def test_parameter_counts_match_the_spec():
    assert n_params(CameraEncoder(backbone="none")) == 6_499_941
    assert n_params(Discriminator(4)) == 291_936
    assert n_params(LightEncoder()) == 1_140_554
    assert n_params(BackgroundEncoder()) == 29_717
    # The spec counts 29,182,213 for the ResNet-34 texture encoder. The difference is exactly one
    # Conv2dBlock(64 -> 64, 3x3, BN) = 64*64*9 + 2*64 = 36,992: the bottom-up lateral conv, which the
    # original also builds in the last (top-down only) BiFPN where it is never used; we do not build it.
    assert n_params(TextureEncoder(backbone="res34")) == 29_182_213 - (64 * 64 * 9 + 2 * 64)


def test_from_scratch_texture_trunk_has_the_original_stage_depths():
    # Per stage with c = 32, 64, 128, 256 input channels and d = 2c: ResBlockHalf 18c² + 4c (two bias-free
    # 3x3 convs + BN), each ResBlock 9d² + 3d, the channel attention d²/8 + d/16 + d; the stem
    # (4 + 2 coordinates -> 32, 5x5, BN) 4,864. With 1, 3, 3, 2 ResBlocks that is 8,592,060; every extra
    # ResBlock over 1, 1, 1, 1 adds 9d² + 3d: 2·(9·128² + 3·128) + 2·(9·256² + 3·256) + 9·512² + 3·512.
    deep = TextureEncoder("none").backbone
    shallow = TextureEncoder("none", scratch_blocks=(1, 1, 1, 1)).backbone
    assert [len(level[1].blocks) for level in deep.levels] == [1, 3, 3, 2]
    assert n_params(deep) == 8_592_060
    extra = 2 * (9 * 128**2 + 3 * 128) + 2 * (9 * 256**2 + 3 * 256) + 9 * 512**2 + 3 * 512
    assert n_params(deep) - n_params(shallow) == extra
    pyramid = deep.pyramid(torch.randn(2, 4, 64, 96))
    assert [tuple(x.shape) for x in pyramid] == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]
    with pytest.raises(ValueError, match="four stages"):
        TextureEncoder("none", scratch_blocks=(1, 0, 1, 1))


def test_hrnet_shape_encoder_parameter_count_matches_the_spec():
    pytest.importorskip("timm")
    assert n_params(ShapeEncoder(642, backbone="hr18sv2")) == 19_362_084


# --------------------------------------------------------------------------- pretrained weights


def test_pretrained_resnet_uses_the_library_weights_and_a_mean_mask_filter(monkeypatch):
    reference = torchvision.models.resnet18()
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict",
                        lambda self, *args, **kwargs: reference.state_dict())
    net = ResNet4C("res18", pretrained=True)
    stem = net.stem[0].weight
    assert torch.equal(stem[:, :3], reference.conv1.weight)
    assert torch.allclose(stem[:, 3], reference.conv1.weight.mean(dim=1))
    assert torch.equal(net.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_unavailable_imagenet_weights_name_the_flag_to_train_from_scratch(monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="--no-pretrained"):
        TextureEncoder("res34", pretrained=True)


def test_unavailable_hrnet_weights_name_the_flag(monkeypatch):
    timm = pytest.importorskip("timm")
    real_create = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("huggingface.co is unreachable")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(RuntimeError, match="--no-pretrained"):
        HRNet4C(pretrained=True)


def test_missing_timm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"pip install \.\[hrnet\]"):
        ShapeEncoder(42, backbone="hr18sv2")


# ---------------------------------------------------------------------------- attribute encoder


def make_encoder(template: Template, **kwargs) -> AttributeEncoder:
    torch.manual_seed(0)
    return AttributeEncoder(template.verts, template.laplacian, 64, 64, **kwargs)


def test_attribute_encoder_returns_consistent_attributes(small_template):
    enc = make_encoder(small_template, predict_background=True, drop_camera=0.2, drop_shape=0.2, drop_texture=0.2)
    attrs = enc(images(2, 64, 64))
    assert isinstance(attrs, Attributes)
    shapes = {"azimuth_deg": (2,), "elevation_deg": (2,), "distance": (2,), "offset": (2, 2),
              "verts": (2, 42, 3), "delta_verts": (2, 42, 3), "texture": (2, 3, 128, 64), "light": (2, 9),
              "background": (2, 3, 64, 64)}
    assert {k: tuple(getattr(attrs, k).shape) for k in shapes} == shapes
    assert torch.allclose(attrs.verts, small_template.verts + attrs.delta_verts)
    assert make_encoder(small_template)(images(2, 64, 64)).background is None


def test_attribute_encoder_rejects_bad_inputs(small_template):
    with pytest.raises(ValueError, match="multiples of 32"):
        AttributeEncoder(small_template.verts, small_template.laplacian, 64, 48)
    enc = make_encoder(small_template)
    with pytest.raises(ValueError, match=r"\(B,4,64,64\)"):
        enc(images(2, 32, 64))
    with pytest.raises(ValueError, match="freeze mode"):
        enc(images(2, 64, 64), mode=6)


def test_template_is_a_checkpointed_buffer_that_set_template_replaces(small_template):
    enc = make_encoder(small_template).eval()
    x = images(2, 64, 64)
    before = enc(x)
    new = small_template.verts * 1.1
    enc.set_template(new)
    after = enc(x)
    assert torch.allclose(after.verts, new + after.delta_verts)
    assert not torch.allclose(after.delta_verts, before.delta_verts)  # shape features read the template
    state = enc.state_dict()
    assert torch.equal(state["template"], new) and "laplacian" not in state
    fresh = make_encoder(small_template)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.template, new)
    with pytest.raises(ValueError, match="new template"):
        enc.set_template(new[:10])


def bn_stats(module: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in module.buffers()]


@pytest.mark.parametrize("mode", sorted(FROZEN_BY_MODE))
def test_frozen_encoders_get_no_gradient_keep_bn_stats_and_match_train_mode(small_template, mode):
    enc = make_encoder(small_template, predict_background=True).train()
    subs = {"camera": enc.camera_encoder, "shape": enc.shape_encoder, "texture": enc.texture_encoder,
            "light": enc.light_encoder, "background": enc.background_encoder}
    copies = {name: copy.deepcopy(m) for name, m in subs.items()}
    stats = {name: bn_stats(m) for name, m in subs.items()}
    x = images(2, 64, 64)
    attrs = enc(x, mode)
    loss = sum(t.pow(2).sum() for t in (attrs.azimuth_deg, attrs.elevation_deg, attrs.distance, attrs.offset,
                                 attrs.delta_verts, attrs.texture, attrs.light, attrs.background))
    loss.backward()
    expected = {  # what a deep copy in train mode computes (no dropout here, so deterministic)
        "camera": copies["camera"](x, small_template.verts)[2],
        "shape": copies["shape"](x, small_template.verts, small_template.laplacian),
        "texture": copies["texture"](x),
        "light": copies["light"](x),
    }
    produced = {"camera": attrs.distance, "shape": attrs.delta_verts, "texture": attrs.texture, "light": attrs.light}
    for name, module in subs.items():
        frozen = name in FROZEN_BY_MODE[mode]
        has_grad = [p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()]
        assert not any(has_grad) if frozen else any(has_grad), name
        if name != "background":  # the only encoder without BatchNorm (and never frozen)
            unchanged = all(torch.equal(a, b) for a, b in zip(stats[name], module.buffers(), strict=True))
            assert unchanged == frozen, name
        if name in expected:
            assert torch.allclose(produced[name], expected[name], atol=1e-5), name


def test_shape_backbone_parameters_are_the_shape_backbone_pretrained_or_not(small_template, monkeypatch):
    enc = make_encoder(small_template)
    assert {id(p) for p in enc.shape_backbone_parameters()} == {id(p) for p in enc.shape_encoder.backbone.parameters()}
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict",
                        lambda self, *args, **kwargs: torchvision.models.resnet18().state_dict())
    enc = make_encoder(small_template, shape_backbone="res18", pretrained=True)
    slow = enc.shape_backbone_parameters()
    assert {id(p) for p in slow} == {id(p) for p in enc.shape_encoder.backbone.parameters()}


def test_mode_for_iteration_follows_the_alternation_policies():
    assert [mode_for_iteration(-1, i) for i in range(6)] == [3, 4, 5, 3, 4, 5]
    assert [mode_for_iteration(0, i) for i in range(3)] == [0, 0, 0]
    assert [mode_for_iteration(3, i) for i in range(7)] == [2, 1, 1, 2, 1, 1, 2]
    assert [mode_for_iteration(1, i) for i in range(3)] == [2, 2, 2]
    with pytest.raises(ValueError, match="update_shape"):
        mode_for_iteration(-2, 0)


# ---------------------------------------------------------------------------------- Attributes


def attributes(b: int, seed: int, background: bool = True) -> Attributes:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.rand(*shape, generator=g)

    return Attributes(azimuth_deg=r(b), elevation_deg=r(b), distance=r(b), offset=r(b, 2), verts=r(b, 5, 3),
                      delta_verts=r(b, 5, 3), texture=r(b, 3, 8, 4), light=r(b, 9),
                      background=r(b, 3, 4, 4) if background else None)


def test_attributes_index_and_detach():
    a = attributes(3, 0)
    a.verts.requires_grad_(True)
    perm = torch.tensor([2, 0, 0])
    b = a.index(perm)
    assert torch.equal(b.texture, a.texture[perm]) and torch.equal(b.light[1], a.light[0])
    b.verts.sum().backward()
    assert torch.equal(a.verts.grad[:, 0, 0], torch.tensor([2.0, 0.0, 1.0]))
    assert not a.detach().verts.requires_grad
    assert attributes(3, 0, background=False).index(perm).background is None


def test_attributes_lerp_uses_separate_weights_and_keeps_the_camera():
    a, b = attributes(2, 0), attributes(2, 1)
    ts, tt, tl = torch.tensor([0.0, 0.25]), torch.tensor([1.0, 0.5]), torch.tensor([0.75, 0.0])
    m = a.lerp(b, shape=ts, texture=tt, light=tl)
    for i in range(2):
        assert torch.allclose(m.verts[i], a.verts[i] + ts[i] * (b.verts[i] - a.verts[i]))
        assert torch.allclose(m.delta_verts[i], a.delta_verts[i] + ts[i] * (b.delta_verts[i] - a.delta_verts[i]))
        assert torch.allclose(m.texture[i], a.texture[i] + tt[i] * (b.texture[i] - a.texture[i]))
        assert torch.allclose(m.background[i], a.background[i] + tt[i] * (b.background[i] - a.background[i]))
        assert torch.allclose(m.light[i], a.light[i] + tl[i] * (b.light[i] - a.light[i]))
    assert torch.equal(m.azimuth_deg, a.azimuth_deg) and torch.equal(m.offset, a.offset)
    moved = m.with_camera(b.azimuth_deg, b.elevation_deg, b.distance, b.offset)
    assert torch.equal(moved.distance, b.distance) and torch.equal(moved.verts, m.verts)
    assert torch.allclose(a.lerp(b, 0.5, 0.5, 0.5).light, (a.light + b.light) / 2)
    with pytest.raises(ValueError, match="background"):
        a.lerp(attributes(2, 1, background=False), 0.5, 0.5, 0.5)


def test_attributes_reject_mismatched_batch_sizes():
    a = attributes(2, 0)
    with pytest.raises(ValueError, match="batch sizes differ"):
        Attributes(**{**a.__dict__, "light": torch.zeros(3, 9)})


def test_attributes_cat_joins_batches_and_renders_like_separate_calls(small_template):
    from renderer.render import render

    a, b = attributes(2, 0), attributes(3, 1)
    both = Attributes.cat([a, b])
    assert both.batch_size == 5 and torch.equal(both.texture[2:], b.texture) and torch.equal(both.light[:2], a.light)
    assert Attributes.cat([attributes(1, 0, background=False)] * 2).background is None
    with pytest.raises(ValueError, match="background"):
        Attributes.cat([a, attributes(2, 1, background=False)])

    g = torch.Generator().manual_seed(0)
    t = small_template

    def scene(n):
        return dict(verts=t.verts + 0.05 * torch.randn(n, *t.verts.shape, generator=g),
                    azimuth_deg=torch.rand(n, generator=g) * 360, elevation_deg=torch.rand(n, generator=g) * 30,
                    distance=2.5 + torch.rand(n, generator=g), offset=0.1 * torch.rand(n, 2, generator=g),
                    texture=torch.rand(n, 3, 32, 16, generator=g), light=torch.rand(n, 9, generator=g))

    def draw(s):
        return render(s["verts"], t.faces, t.face_uvs, s["azimuth_deg"], s["elevation_deg"], s["distance"],
                      s["offset"], s["texture"], s["light"], height=16, width=16)

    first, second = scene(2), scene(1)
    joint = draw({k: torch.cat([first[k], second[k]]) for k in first})
    apart = [draw(first), draw(second)]
    assert torch.equal(joint.rgb, torch.cat([o.rgb for o in apart]))
    assert torch.equal(joint.silhouette, torch.cat([o.silhouette for o in apart]))
