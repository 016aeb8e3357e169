"""DIB-R rasterizer reference against hand-computed values and spec/renderer-math.md §6 (T2, T3, T5, T6)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import renderer.rasterize
from renderer.rasterize import rasterize, rasterize_reference

F64 = torch.float64
DTYPES = [torch.float32, torch.float64]


def _flat_scene(corners, depth=-2.0, normals_z=1.0, dtype=F64, features=None):
    """One image of faces with the given NDC corners (F, 3, 2), constant depth, one-hot corner features."""
    verts = torch.tensor(corners, dtype=dtype)[None]
    num_faces = verts.shape[1]
    z = torch.full((1, num_faces, 3), depth, dtype=dtype)
    if features is None:
        features = torch.eye(3, dtype=dtype).expand(1, num_faces, 3, 3)
    normals = torch.as_tensor(normals_z, dtype=dtype).expand(1, num_faces).clone()
    return verts, z, features.clone(), normals


def _simple_set(dtype):
    """Kaolin's "simple" test scene (T2): 2 images x 3 faces, drawn without culling."""
    verts = torch.tensor(
        [
            [[[-0.7, 0.0], [0.0, -0.7], [0.0, 0.7]], [[-0.7, 0.0], [0.0, 0.7], [0.0, -0.7]],
             [[0.0, -0.7], [0.0, 0.7], [0.7, 0.0]]],
            [[[-0.7, -0.7], [0.7, -0.7], [-0.7, 0.7]]] * 3,
        ],
        dtype=dtype,
    )
    z = torch.tensor(
        [[[-2.0, -1.0, -1.0], [-2.5, -3.0, -3.0], [-2.0, -2.0, -2.0]],
         [[-2.0, -1.0, -3.0], [-2.0, -2.0, -2.0], [-2.0, -3.0, -1.0]]],
        dtype=dtype,
    )
    return verts, z, torch.zeros(2, 3, 3, 1, dtype=dtype), torch.zeros(2, 3, dtype=dtype)


def _square(dtype=F64):
    """T3: the square [-.5, .5]^2 as two triangles sharing the diagonal."""
    return _flat_scene([[[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5]], [[-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]],
                       dtype=dtype)


def _mask_iou_loss(pred, target):
    # Kaolin's mask_iou loss, written out so this test depends on the rasterizer only
    intersection = (pred * target).sum((1, 2))
    union = (pred + target - pred * target).sum((1, 2))
    return 1 - (intersection / (union + 1e-10)).mean()


def _random_scene(seed, batch=2, num_faces=40, dtype=F64):
    """Small random triangles (some culled) with random depths and 2 feature channels."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, num_faces, 1, 2, generator=gen) * 1.6 - 0.8
    verts = centres + torch.rand(batch, num_faces, 3, 2, generator=gen) * 0.4 - 0.2
    z = -2 - torch.rand(batch, num_faces, 3, generator=gen)
    features = torch.rand(batch, num_faces, 3, 2, generator=gen)
    normals = torch.rand(batch, num_faces, generator=gen) - 0.3
    return verts.to(dtype), z.to(dtype), features.to(dtype), normals.to(dtype)


# --- T2: single triangle ------------------------------------------------------------------------------


def test_single_triangle_coverage_weights_and_soft_mask():
    out = rasterize_reference(*_flat_scene([[[-1, -1], [1, -1], [-1, 1]]]), 4, 4)
    coverage = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.equal(out.face_idx[0] + 1, coverage)  # lower-left triangle: y up, row 0 on top
    expected = {(3, 0): (0.75, 0.125, 0.125), (0, 0): (0.0, 0.125, 0.875), (3, 3): (0.0, 0.875, 0.125)}
    for (row, col), weights in expected.items():
        torch.testing.assert_close(out.features[0, row, col], torch.tensor(weights, dtype=F64))
    assert torch.equal(out.features[0][coverage == 0], torch.zeros(6, 3, dtype=F64))
    # the nearest uncovered centre is 0.354 NDC away: exp(-7000 * 0.125) is 0
    assert torch.equal(out.soft_mask[0], coverage.to(F64))


def test_reversed_winding_gives_same_coverage_and_weights():
    forward = rasterize_reference(*_flat_scene([[[-1, -1], [1, -1], [-1, 1]]]), 4, 4)
    reversed_ = rasterize_reference(*_flat_scene([[[-1, -1], [-1, 1], [1, -1]]]), 4, 4)
    assert torch.equal(forward.face_idx, reversed_.face_idx)
    # corner 1 and 2 swapped places, so their weights swap channels
    torch.testing.assert_close(reversed_.features[..., [0, 2, 1]], forward.features, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_simple_set_half_open_box_and_ties(dtype):
    out = rasterize_reference(*_simple_set(dtype), 35, 31)
    counts = [torch.bincount(out.face_idx[b].flatten() + 1, minlength=4).tolist() for b in range(2)]
    assert counts == [[820, 120, 0, 145], [822, 137, 0, 126]]
    # column 15 sits on x = 0: A's max-x (excluded) and C's min-x (included), so C wins it although A is nearer
    column = out.face_idx[0, :, 15]
    assert set(column.tolist()) == {-1, 2}
    # batch 1: three copies of one triangle; where faces 0 and 2 tie in depth, face 0 (lowest index) wins
    assert (out.face_idx[1] == 1).sum() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("sigma_inv", "box_len", "sums"),
    [(7000, 0.02, [281.3213, 293.4943]), (70, 0.02, [386.6299, 366.5306]), (70, 0.2, [417.3876, 478.6068])],
)
def test_simple_set_soft_mask_sums(dtype, sigma_inv, box_len, sums):
    out = rasterize_reference(*_simple_set(dtype), 35, 31, sigma_inv=sigma_inv, box_len=box_len, knum=30)
    torch.testing.assert_close(out.soft_mask.sum((1, 2)).double(), torch.tensor(sums, dtype=F64),
                               rtol=0, atol=2e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_simple_set_golden_gradient_of_mask_iou(dtype):
    """T6: Kaolin's golden gradient of mask_iou(S, hard mask shifted left by 5 columns)."""
    verts, z, features, normals = _simple_set(dtype)
    verts.requires_grad_(True)
    out = rasterize_reference(verts, z, features, normals, 35, 31)
    target = torch.nn.functional.pad(out.face_idx >= 0, (0, 5))[..., 5:].to(dtype)
    _mask_iou_loss(out.soft_mask, target).backward()
    b0 = [[(0.11680, 0), (0.05254, 0.05254), (0.05254, -0.05254)],
          [(0.11680, 0), (0.05254, -0.05254), (0.05254, 0.05254)],
          [(0.04790, -0.04790), (0.04790, 0.04790), (0.10786, 0)]]
    b1 = [[(0.24368, 0), (0.04451, 0.04451), (0.13142, 0.03008)]] * 3
    torch.testing.assert_close(verts.grad.double(), torch.tensor([b0, b1], dtype=F64), rtol=0, atol=1e-5)


# --- T3: square of two triangles -----------------------------------------------------------------------


def test_square_64x64_coverage_tie_soft_values_and_gradient():
    verts, z, features, normals = _square()
    verts.requires_grad_(True)
    out = rasterize_reference(verts, z, features, normals, 64, 64)
    face_idx, soft = out.face_idx[0], out.soft_mask[0]
    covered = torch.zeros(64, 64, dtype=torch.bool)
    covered[16:48, 16:48] = True
    assert torch.equal(face_idx >= 0, covered)
    assert (face_idx == 0).sum() == 528 and (face_idx == 1).sum() == 496
    diagonal = torch.arange(16, 48)
    assert torch.equal(face_idx[47 - (diagonal - 16), diagonal], torch.zeros(32, dtype=torch.long))
    edge = math.exp(-7000 / 4096)  # d = 1/64
    torch.testing.assert_close(soft[31, 48].item(), edge, rtol=0, atol=1e-6)
    torch.testing.assert_close(soft[15, 31].item(), edge, rtol=0, atol=1e-6)
    assert soft[31, 49] == 0  # outside every enlarged box
    corner = 1 - (1 - math.exp(-7000 * 2 / 4096)) ** 2  # both triangles own the corner vertex
    torch.testing.assert_close(soft[15, 48].item(), corner, rtol=0, atol=1e-6)
    torch.testing.assert_close(soft.sum().item(), 1047.476252, rtol=0, atol=1e-5)
    soft[31, 48].backward()
    expected = torch.zeros(1, 2, 3, 2, dtype=F64)
    expected[0, 0, 1, 0], expected[0, 0, 2, 0] = 19.1835, 20.4211
    torch.testing.assert_close(verts.grad, expected, rtol=0, atol=1e-4)


def test_square_non_square_image_128x64():
    out = rasterize_reference(*_square(), 128, 64)
    face_idx, soft = out.face_idx[0], out.soft_mask[0]
    covered = torch.zeros(128, 64, dtype=torch.bool)
    covered[32:96, 16:48] = True
    assert torch.equal(face_idx >= 0, covered)
    # a pixel is 1/32 NDC wide and 1/64 NDC tall: the soft band is anisotropic in pixels
    torch.testing.assert_close(soft[64, 48].item(), math.exp(-7000 / 64**2), rtol=0, atol=1e-6)
    assert soft[64, 49] == 0
    torch.testing.assert_close(soft[31, 30].item(), math.exp(-7000 / 128**2), rtol=0, atol=1e-6)
    assert soft[30, 30] == 0
    torch.testing.assert_close(soft[31, 48].item(), 0.222251, rtol=0, atol=1e-6)
    torch.testing.assert_close(soft.sum().item(), 2113.905474, rtol=0, atol=1e-5)


# --- T5 and the feature backward ----------------------------------------------------------------------


def test_barycentric_backward_identity():
    """Features equal to the corners' own x: dI/df_k = w_k, dI/dx_k = -w_k, dI/dy_k = 0 (up to the 1e-8)."""
    verts = torch.tensor([[[[-0.9, -0.8], [0.7, -0.6], [-0.5, 0.9]]]], dtype=F64, requires_grad=True)
    features = verts[..., :1].detach().clone().requires_grad_(True)
    z, normals = torch.full((1, 1, 3), -2.0, dtype=F64), torch.ones(1, 1, dtype=F64)
    out = rasterize_reference(verts, z, features, normals, 8, 8)
    assert out.face_idx[0, 5, 2] == 0
    torch.testing.assert_close(out.features[0, 5, 2, 0].item(), -0.375)
    out.features[0, 5, 2, 0].backward()
    weights = torch.tensor([0.508523, 0.273674, 0.217803], dtype=F64)
    torch.testing.assert_close(features.grad.flatten(), weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(verts.grad[0, 0, :, 0], -weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(verts.grad[0, 0, :, 1], torch.zeros(3, dtype=F64), rtol=0, atol=1e-6)


def test_constant_features_give_no_position_gradient_and_depth_gets_none():
    verts, z, _, normals = _square()
    features = torch.ones(1, 2, 3, 1, dtype=F64, requires_grad=True)
    verts.requires_grad_(True)
    z.requires_grad_(True)
    out = rasterize_reference(verts, z, features, normals, 16, 16)
    out.features.sum().backward()
    assert torch.equal(verts.grad, torch.zeros_like(verts))
    assert z.grad is None
    # each corner's feature gradient is the sum of its weights over the face's pixels (64 px in total)
    torch.testing.assert_close(features.grad.sum(), torch.tensor(64.0, dtype=F64))


# --- hand-placed triangles: depth, culling, soft mask ------------------------------------------------


def test_nearest_face_wins_and_culling_uses_normal_z():
    big = [[-1, -1], [1, -1], [-1, 1]]
    far, near = -3.0, -1.0
    verts = torch.tensor([[big, big]], dtype=F64)
    z = torch.tensor([[[far] * 3, [near] * 3]], dtype=F64)
    features = torch.tensor([[[[1.0]] * 3, [[2.0]] * 3]], dtype=F64)

    def winner(normals_z):
        out = rasterize_reference(verts, z, features, torch.tensor([normals_z], dtype=F64), 4, 4)
        # weights sum to n / (n + 1e-8) in scaled units: a hair below 1
        feature = round(out.features[0, 3, 0, 0].item(), 9)
        return out.face_idx[0, 3, 0].item(), feature, out.soft_mask[0, 3, 0].item()

    assert winner([1.0, 1.0]) == (1, 2.0, 1.0)  # the nearer (larger z) face
    assert winner([1.0, -1e-6]) == (0, 1.0, 1.0)  # nearer face culled
    assert winner([1.0, 0.0]) == (1, 2.0, 1.0)  # exactly 0 is kept
    assert winner([-1.0, -1.0]) == (-1, 0.0, 0.0)  # all culled: background


def test_culled_face_soft_mask_uses_distance_to_its_boundary():
    """A culled triangle covers nothing, but shapes the soft mask by the distance to its edges/corners."""
    scene = _flat_scene([[[-0.5, -0.5], [0.6, -0.5], [-0.5, 0.6]]], normals_z=-1.0)
    out = rasterize_reference(*scene, 4, 4, sigma_inv=70.0, box_len=0.3)
    assert torch.equal(out.face_idx, torch.full((1, 4, 4), -1))
    assert torch.equal(out.features, torch.zeros(1, 4, 4, 3, dtype=F64))
    expected = {
        (2, 1): 0.25**2,  # centre (-.25,-.25) inside: bottom and left edges at 0.25
        (1, 1): 0.1**2 / 2,  # centre (-.25,.25) inside: hypotenuse x + y = 0.1
        (1, 2): 0.4**2 / 2,  # centre (.25,.25) outside: foot (.05,.05) on the hypotenuse
        (3, 3): 0.15**2 + 0.25**2,  # centre (.75,-.75): every foot is off its edge, corner (.6,-.5)
        (3, 0): 2 * 0.25**2,  # centre (-.75,-.75): corner (-.5,-.5)
    }
    for (row, col), d2 in expected.items():
        torch.testing.assert_close(out.soft_mask[0, row, col].item(), math.exp(-70 * d2), rtol=1e-12, atol=0)
    assert out.soft_mask[0, 0, 3] == 0  # centre (.75,.75) is outside the enlarged box [-.8,.9]^2


def test_soft_mask_keeps_the_first_knum_faces_by_index_not_the_nearest():
    """Three faces below a 1x1 image's centre at distances .15, .10, .05: knum=2 ignores the nearest."""
    gaps = (0.15, 0.10, 0.05)
    corners = [[[-0.5, -a], [0.5, -a], [0.0, -a - 0.5]] for a in gaps]
    probs = [math.exp(-70 * a * a) for a in gaps]
    for knum, expected in ((2, 1 - (1 - probs[0]) * (1 - probs[1])), (3, 1 - math.prod(1 - p for p in probs))):
        verts, z, features, normals = _flat_scene(corners)
        verts.requires_grad_(True)
        out = rasterize_reference(verts, z, features, normals, 1, 1, sigma_inv=70.0, box_len=0.2, knum=knum)
        torch.testing.assert_close(out.soft_mask.item(), expected, rtol=1e-12, atol=0)
        out.soft_mask.sum().backward()
        assert (verts.grad[0, 2] != 0).any() == (knum == 3)


def test_covered_pixels_have_soft_mask_one_without_gradient():
    verts, z, features, normals = _square()
    verts.requires_grad_(True)
    out = rasterize_reference(verts, z, features, normals, 16, 16)
    assert out.soft_mask[0, 8, 8] == 1
    out.soft_mask[0, 8, 8].backward()
    assert torch.equal(verts.grad, torch.zeros_like(verts))


def test_faces_outside_the_image_or_non_finite_cover_nothing():
    verts, z, features, normals = _flat_scene(
        [[[2.0, 2.0], [3.0, 2.0], [2.0, 3.0]], [[-0.9, -0.9], [math.inf, -0.9], [-0.9, 0.9]]]
    )
    verts.requires_grad_(True)
    out = rasterize_reference(verts, z, features, normals, 6, 5)
    assert torch.equal(out.face_idx, torch.full((1, 6, 5), -1))
    assert torch.equal(out.soft_mask, torch.zeros(1, 6, 5, dtype=F64))
    (out.soft_mask.sum() + out.features.sum()).backward()
    assert torch.equal(verts.grad, torch.zeros_like(verts))


# --- gradients against finite differences, precision, chunking ---------------------------------------


def test_gradcheck_features_and_soft_mask_float64():
    """Small non-square scene with a culled face and a wide soft band; no pixel centre near a box edge."""
    verts = torch.tensor(
        [[[[-0.63, -0.41], [0.37, -0.52], [-0.12, 0.58]],
          [[0.21, -0.13], [0.83, 0.09], [0.44, 0.71]],
          [[-0.83, 0.32], [-0.28, 0.86], [-0.71, 0.93]]]],
        dtype=F64, requires_grad=True,
    )
    z = torch.tensor([[[-2.0, -2.2, -2.1], [-1.7, -1.9, -1.8], [-2.5, -2.4, -2.6]]], dtype=F64)
    features = torch.rand(1, 3, 3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    features.requires_grad_(True)
    normals = torch.tensor([[1.0, 0.5, -1.0]], dtype=F64)

    def run(verts, features):
        out = rasterize_reference(verts, z, features, normals, 7, 9, sigma_inv=70.0, box_len=0.2)
        return out.features, out.soft_mask

    features_out, soft = run(verts, features)
    assert (features_out != 0).any() and ((soft > 0.01) & (soft < 1)).sum() > 10
    # the soft mask's analytic slope uses Kaolin's (1 - P + 1e-7): allow that relative error
    assert torch.autograd.gradcheck(run, (verts, features), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_matches_float64(seed):
    results = []
    for dtype in DTYPES:
        verts, z, features, normals = _random_scene(seed, dtype=dtype)
        verts.requires_grad_(True)
        features.requires_grad_(True)
        out = rasterize_reference(verts, z, features, normals, 24, 20, sigma_inv=700.0, box_len=0.05)
        (out.features.square().sum() + out.soft_mask.square().sum()).backward()
        results.append((out, verts.grad, features.grad))
    (out32, verts32, feat32), (out64, verts64, feat64) = results
    assert torch.equal(out32.face_idx, out64.face_idx)
    torch.testing.assert_close(out32.features.double(), out64.features, rtol=0, atol=1e-5)
    torch.testing.assert_close(out32.soft_mask.double(), out64.soft_mask, rtol=0, atol=1e-5)
    torch.testing.assert_close(feat32.double(), feat64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(verts32.double(), verts64, rtol=1e-3, atol=1e-3)


def test_chunked_enumeration_matches_one_chunk(monkeypatch):
    """Tiny chunks (and knum=3, so pixels drop candidates) give the result of a single chunk."""

    def run():
        verts, z, features, normals = _random_scene(2, num_faces=60)
        verts.requires_grad_(True)
        features.requires_grad_(True)
        out = rasterize_reference(verts, z, features, normals, 21, 26, sigma_inv=300.0, box_len=0.1, knum=3)
        (out.features.sum() + out.soft_mask.sum()).backward()
        return out, verts.grad, features.grad

    whole, whole_verts, whole_features = run()
    monkeypatch.setattr(renderer.rasterize, "_PAIRS_PER_CHUNK", 7)
    chunked, chunked_verts, chunked_features = run()
    assert torch.equal(whole.face_idx, chunked.face_idx)
    assert torch.equal(whole.features, chunked.features)
    assert torch.equal(whole.soft_mask, chunked.soft_mask)
    torch.testing.assert_close(whole_verts, chunked_verts, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole_features, chunked_features, rtol=1e-12, atol=1e-12)


def _bench_render_module():
    """bench/render.py, which is a script folder, not a package."""
    path = Path(__file__).resolve().parents[1] / "bench" / "render.py"
    spec = importlib.util.spec_from_file_location("bench_render", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairs_per_chunk", [1 << 23, 700])
def test_brute_force_pass_of_the_benchmark_matches_the_reference(monkeypatch, dtype, pairs_per_chunk):
    """Every pixel against every face (bench/render.py) gives what the box enumeration gives: so the
    enumeration drops no pair, and the benchmark's brute-force column computes the same thing."""
    bench = _bench_render_module()
    monkeypatch.setattr(bench, "BRUTE_FORCE_PAIRS", pairs_per_chunk)  # 700: faces in chunks of 1
    results = {}
    for name, fn, knum in (("brute", bench.brute_force_rasterize, 3), ("reference", rasterize_reference, 3),
                           ("reference knum 30", rasterize_reference, 30)):
        verts, z, features, normals = _random_scene(0, num_faces=60, dtype=dtype)
        verts[0, 5, 1, 0], z[1, 7, 2] = math.inf, -math.inf  # two non-finite faces, ignored by both
        verts.requires_grad_(True)
        features.requires_grad_(True)
        out = fn(verts, z, features, normals, 21, 26, sigma_inv=300.0, box_len=0.1, knum=knum)
        gen = torch.Generator().manual_seed(1)
        weight_features = torch.rand(out.features.shape, generator=gen, dtype=dtype)
        weight_soft = torch.rand(out.soft_mask.shape, generator=gen, dtype=dtype)
        ((out.features * weight_features).sum() + (out.soft_mask * weight_soft).sum()).backward()
        results[name] = (out, verts.grad, features.grad)
    (brute, brute_verts, brute_features), (ref, ref_verts, ref_features) = results["brute"], results["reference"]
    assert not torch.equal(ref.soft_mask, results["reference knum 30"][0].soft_mask)  # knum = 3 binds
    assert torch.equal(brute.face_idx, ref.face_idx)
    torch.testing.assert_close(brute.features, ref.features, rtol=0, atol=1e-6)
    torch.testing.assert_close(brute.soft_mask, ref.soft_mask, rtol=0, atol=1e-6)
    # autograd through the dense pass against the closed forms, which add Kaolin's small epsilons
    for brute_grad, ref_grad in ((brute_verts, ref_verts), (brute_features, ref_features)):
        torch.testing.assert_close(brute_grad, ref_grad, rtol=1e-4, atol=1e-4 * ref_grad.abs().max().item())


# --- entry point and input checks -------------------------------------------------------------------


def test_public_entry_runs_the_reference_on_cpu():
    scene = _random_scene(3)
    public, reference = rasterize(*scene, 12, 10), rasterize_reference(*scene, 12, 10)
    for name in ("features", "soft_mask", "face_idx"):
        assert torch.equal(getattr(public, name), getattr(reference, name))


def test_invalid_inputs_raise_with_a_message():
    verts, z, features, normals = _square()
    with pytest.raises(ValueError, match="face_verts_image must be"):
        rasterize_reference(verts[..., :1], z, features, normals, 8, 8)
    with pytest.raises(ValueError, match="face_verts_z must be"):
        rasterize_reference(verts, z[..., :2], features, normals, 8, 8)
    with pytest.raises(TypeError, match="cast them to one dtype"):
        rasterize_reference(verts, z.float(), features, normals, 8, 8)
    with pytest.raises(ValueError, match="height and width"):
        rasterize_reference(verts, z, features, normals, 0, 8)
    with pytest.raises(ValueError, match="knum"):
        rasterize_reference(verts, z, features, normals, 8, 8, knum=0)


def test_zero_feature_channels_still_give_face_index_soft_mask_and_gradient():
    verts, z, _, normals = _square()
    verts.requires_grad_(True)
    out = rasterize_reference(verts, z, torch.zeros(1, 2, 3, 0, dtype=F64), normals, 64, 64)
    assert out.features.shape == (1, 64, 64, 0)
    assert (out.face_idx >= 0).sum() == 1024
    out.soft_mask[0, 31, 48].backward()
    # the right edge's two corners share 2 sigma^-1 d P (up to Kaolin's 1e-7 in 1 - P + 1e-7)
    expected = 2 * 7000 / 64 * math.exp(-7000 / 4096)
    torch.testing.assert_close(verts.grad[0, 0, 1:, 0].sum().item(), expected, rtol=1e-6, atol=0)
