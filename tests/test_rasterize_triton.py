"""Triton fast path of the DIB-R rasterizer against the reference and hand-computed values.

With a GPU the kernels are compiled and the comparisons run at the method's full sizes. Without
one they run on the CPU under Triton's interpreter on small images. Triton picks the interpreter
when it is first imported (TRITON_INTERPRET=1), and other test modules import it earlier
(torchvision does), so on the CPU `test_cpu_run_under_triton_interpreter` runs this file in a
fresh process with the variable set; the kernel tests run there, not in the parent process.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from renderer.camera import FOVY_RAD, camera_transform, perspective_projection, project, world_to_camera
from renderer.mesh import Template, face_normals, gather_faces
from renderer.rasterize import rasterize, rasterize_reference
from renderer.rasterize_triton import rasterize_triton

CUDA = torch.cuda.is_available()
KERNELS_RUN_HERE = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
in_this_process = pytest.mark.skipif(
    not KERNELS_RUN_HERE, reason="CPU: runs in the child process of test_cpu_run_under_triton_interpreter"
)
DEVICE = torch.device("cuda" if CUDA else "cpu")
F64 = torch.float64
DTYPES = [torch.float32, torch.float64]
# (batch, faces, height, width) of the random scenes; icosphere (batch, subdivisions, height, width)
RANDOM_SIZE = (8, 1280, 128, 96) if CUDA else (2, 12, 12, 16)
SPHERE_SIZE = (8, 3, 128, 128) if CUDA else (1, 0, 16, 12)


def _random_scene(seed, dtype, batch, num_faces):
    """Random triangles of mixed sizes, a third of them culled, some reaching past the image."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, num_faces, 1, 2, generator=gen) * 2.2 - 1.1
    sizes = 0.05 + 0.5 * torch.rand(batch, num_faces, 1, 1, generator=gen) ** 3
    verts = centres + sizes * (torch.rand(batch, num_faces, 3, 2, generator=gen) * 2 - 1)
    z = -2 - torch.rand(batch, num_faces, 3, generator=gen)
    features = torch.rand(batch, num_faces, 3, 5, generator=gen)
    normals = torch.rand(batch, num_faces, generator=gen) - 0.33
    return [t.to(dtype=dtype, device=DEVICE) for t in (verts, z, features, normals)]


def _sphere_scene(seed, dtype, batch, subdivisions, height, width):
    """The icosphere template seen from random cameras, with the renderer's UV + normal features."""
    gen = torch.Generator().manual_seed(seed)
    template = Template.icosphere(subdivisions=subdivisions)
    verts = template.verts.to(dtype).expand(batch, -1, -1)
    azimuth = torch.rand(batch, generator=gen) * 360
    elevation = torch.rand(batch, generator=gen) * 60 - 30
    distance = 2 + torch.rand(batch, generator=gen) * 3
    offset = torch.rand(batch, 2, generator=gen) * 0.2 - 0.1
    transform = camera_transform(azimuth.to(dtype), elevation.to(dtype), distance.to(dtype), offset.to(dtype))
    verts_cam = world_to_camera(verts, transform)
    proj = perspective_projection(FOVY_RAD, width / height, dtype=dtype)
    face_cam = gather_faces(verts_cam, template.faces)
    normals = face_normals(face_cam)
    num_faces = template.faces.shape[0]
    features = torch.cat([template.face_uvs.to(dtype).expand(batch, num_faces, 3, 2),
                          normals[:, :, None].expand(batch, num_faces, 3, 3)], dim=-1)
    scene = (gather_faces(project(verts_cam, proj), template.faces), face_cam[..., 2], features, normals[..., 2])
    return [t.to(DEVICE) for t in scene]


def _run(fn, scene, height, width, **settings):
    """Forward, then backward of a fixed random weighting of features and soft mask."""
    verts, z, features, normals = scene
    verts = verts.clone().requires_grad_(True)
    features = features.clone().requires_grad_(True)
    out = fn(verts, z, features, normals, height, width, **settings)
    gen = torch.Generator().manual_seed(123)
    weight_features = torch.rand(out.features.shape, generator=gen, dtype=verts.dtype).to(DEVICE)
    weight_soft = torch.rand(out.soft_mask.shape, generator=gen, dtype=verts.dtype).to(DEVICE)
    ((out.features * weight_features).sum() + (out.soft_mask * weight_soft).sum()).backward()
    return out, verts.grad, features.grad


def _assert_matches_reference(scene, height, width, **settings):
    fast, fast_verts, fast_features = _run(rasterize_triton, scene, height, width, **settings)
    ref, ref_verts, ref_features = _run(rasterize_reference, scene, height, width, **settings)
    assert (ref.face_idx >= 0).any() and ((ref.soft_mask > 0) & (ref.soft_mask < 1)).any()
    # same arithmetic in the same order: coverage and ties agree exactly, also at exact-edge pixels
    assert torch.equal(fast.face_idx, ref.face_idx)
    torch.testing.assert_close(fast.features, ref.features, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.soft_mask, ref.soft_mask, rtol=0, atol=1e-5)
    for fast_grad, ref_grad in ((fast_verts, ref_verts), (fast_features, ref_features)):
        assert ref_grad.abs().max() > 0
        torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-4, atol=1e-4 * ref_grad.abs().max().item())


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("knum", [30, 3])
def test_matches_reference_on_random_meshes(dtype, knum):
    batch, num_faces, height, width = RANDOM_SIZE
    scene = _random_scene(knum, dtype, batch, num_faces)
    _assert_matches_reference(scene, height, width, sigma_inv=3000.0, box_len=0.1, knum=knum)


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_on_icosphere_under_random_cameras(dtype):
    batch, subdivisions, height, width = SPHERE_SIZE
    _assert_matches_reference(_sphere_scene(0, dtype, batch, subdivisions, height, width), height, width)


@in_this_process
@pytest.mark.parametrize("used", ["features", "soft_mask"])
def test_loss_of_one_output_only(used):
    """The gradient of the output the loss ignores reaches the backward as None."""
    batch, num_faces, height, width = RANDOM_SIZE
    verts, z, features, normals = _random_scene(7, F64, batch, num_faces)
    grads = []
    for fn in (rasterize_triton, rasterize_reference):
        leaf = verts.clone().requires_grad_(True)
        out = fn(leaf, z, features, normals, height, width, sigma_inv=3000.0, box_len=0.1)
        (getattr(out, used) ** 2).sum().backward()
        grads.append(leaf.grad)
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4 * grads[1].abs().max().item())


def _flat_scene(corners, normals_z=1.0, dtype=F64):
    """One image of faces with the given NDC corners (F, 3, 2), depth −2, one-hot corner features."""
    verts = torch.tensor(corners, dtype=dtype)[None]
    num_faces = verts.shape[1]
    z = torch.full((1, num_faces, 3), -2.0, dtype=dtype)
    features = torch.eye(3, dtype=dtype).expand(1, num_faces, 3, 3).clone()
    normals = torch.full((1, num_faces), normals_z, dtype=dtype)
    return [t.to(DEVICE) for t in (verts, z, features, normals)]


@in_this_process
def test_single_triangle_coverage_and_weights():
    """T2: a 4×4 image, corners (−1,−1), (1,−1), (−1,1); pixels on the hypotenuse are covered."""
    out = rasterize_triton(*_flat_scene([[[-1, -1], [1, -1], [-1, 1]]]), 4, 4)
    coverage = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], device=DEVICE)
    assert torch.equal(out.face_idx[0] + 1, coverage)
    expected = {(3, 0): (0.75, 0.125, 0.125), (0, 0): (0.0, 0.125, 0.875), (3, 3): (0.0, 0.875, 0.125)}
    for (row, col), weights in expected.items():
        torch.testing.assert_close(out.features[0, row, col].cpu(), torch.tensor(weights, dtype=F64))
    assert torch.equal(out.soft_mask[0], coverage.to(F64))  # nearest outside centre: 0.354 NDC away


@in_this_process
def test_half_open_box_and_depth_ties():
    """T2, Kaolin's "simple" scene at 35×31: the centre column x = 0 goes to C (its min-x) not to
    the nearer A (its max-x); three copies of a triangle: where faces 0 and 2 tie in depth, 0 wins."""
    verts = torch.tensor([[[[-0.7, 0.0], [0.0, -0.7], [0.0, 0.7]], [[-0.7, 0.0], [0.0, 0.7], [0.0, -0.7]],
                           [[0.0, -0.7], [0.0, 0.7], [0.7, 0.0]]],
                          [[[-0.7, -0.7], [0.7, -0.7], [-0.7, 0.7]]] * 3])
    z = torch.tensor([[[-2.0, -1.0, -1.0], [-2.5, -3.0, -3.0], [-2.0, -2.0, -2.0]],
                      [[-2.0, -1.0, -3.0], [-2.0, -2.0, -2.0], [-2.0, -3.0, -1.0]]])
    scene = [t.to(DEVICE) for t in (verts, z, torch.zeros(2, 3, 3, 1), torch.zeros(2, 3))]
    out = rasterize_triton(*scene, 35, 31)
    counts = [torch.bincount(out.face_idx[b].flatten() + 1, minlength=4).tolist() for b in range(2)]
    assert counts == [[820, 120, 0, 145], [822, 137, 0, 126]]
    assert set(out.face_idx[0, :, 15].tolist()) == {-1, 2}


@in_this_process
def test_square_soft_mask_values_and_gradient():
    """T3: the square [−.5,.5]² as two triangles at 64×64: coverage, diagonal tie, soft values, and
    the gradient of S at the right-edge neighbour (31, 48), which only the x of face 0's right edge gets."""
    verts, z, features, normals = _flat_scene([[[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5]],
                                               [[-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]])
    verts.requires_grad_(True)
    out = rasterize_triton(verts, z, features, normals, 64, 64)
    face_idx, soft = out.face_idx[0].cpu(), out.soft_mask[0].detach().cpu()
    covered = torch.zeros(64, 64, dtype=torch.bool)
    covered[16:48, 16:48] = True
    assert torch.equal(face_idx >= 0, covered)
    assert (face_idx == 0).sum() == 528 and (face_idx == 1).sum() == 496  # the diagonal goes to face 0
    edge = math.exp(-7000 / 64**2)  # d = 1/64 NDC
    assert soft[31, 48].item() == pytest.approx(edge, abs=1e-6)
    assert soft[15, 31].item() == pytest.approx(edge, abs=1e-6)
    assert soft[31, 49] == 0  # beyond every enlarged box
    assert soft[15, 48].item() == pytest.approx(1 - (1 - math.exp(-7000 * 2 / 64**2)) ** 2, abs=1e-6)
    assert soft.sum().item() == pytest.approx(1047.476252, abs=1e-5)
    out.soft_mask[0, 31, 48].backward()
    expected = torch.zeros(1, 2, 3, 2, dtype=F64)
    expected[0, 0, 1, 0], expected[0, 0, 2, 0] = 19.1835, 20.4211
    torch.testing.assert_close(verts.grad.cpu(), expected, rtol=0, atol=1e-4)


@in_this_process
def test_soft_mask_keeps_the_first_knum_faces_by_index():
    """Three faces below a 1×1 image's centre at distances .15, .10, .05 NDC: with knum = 2 the
    nearest (last) face is ignored and gets no gradient; with knum = 3 it counts."""
    gaps = (0.15, 0.10, 0.05)
    corners = [[[-0.5, -a], [0.5, -a], [0.0, -a - 0.5]] for a in gaps]
    probs = [math.exp(-70 * a * a) for a in gaps]
    for knum in (2, 3):
        verts, z, features, normals = _flat_scene(corners)
        verts.requires_grad_(True)
        out = rasterize_triton(verts, z, features, normals, 1, 1, sigma_inv=70.0, box_len=0.2, knum=knum)
        expected = 1 - math.prod(1 - p for p in probs[:knum])
        assert out.soft_mask.item() == pytest.approx(expected, rel=1e-12)
        out.soft_mask.sum().backward()
        assert bool((verts.grad[0, 2] != 0).any()) == (knum == 3)


@in_this_process
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the inf face, masked out
def test_faces_off_image_culled_or_non_finite_cover_nothing():
    verts, z, features, normals = _flat_scene(
        [[[2.0, 2.0], [3.0, 2.0], [2.0, 3.0]], [[-0.9, -0.9], [math.inf, -0.9], [-0.9, 0.9]],
         [[-0.9, -0.9], [0.9, -0.9], [-0.9, 0.9]]]
    )
    normals[0, 2] = -1.0  # culled, but its edges still shape the soft mask
    verts.requires_grad_(True)
    out = rasterize_triton(verts, z, features, normals, 6, 5, sigma_inv=70.0)
    assert torch.equal(out.face_idx, torch.full((1, 6, 5), -1, device=DEVICE))
    assert torch.equal(out.features, torch.zeros(1, 6, 5, 3, dtype=F64, device=DEVICE))
    assert (out.soft_mask > 0).any()
    out.soft_mask.sum().backward()
    assert torch.equal(verts.grad[0, :2], torch.zeros(2, 3, 2, dtype=F64, device=DEVICE))
    assert (verts.grad[0, 2] != 0).any()


@in_this_process
def test_backward_is_deterministic():
    batch, num_faces, height, width = RANDOM_SIZE
    scene = _random_scene(7, torch.float32, batch, num_faces)
    _, verts_a, features_a = _run(rasterize_triton, scene, height, width, box_len=0.1)
    _, verts_b, features_b = _run(rasterize_triton, scene, height, width, box_len=0.1)
    assert torch.equal(verts_a, verts_b) and torch.equal(features_a, features_b)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        rasterize_triton(*[t.cpu() for t in _flat_scene([[[-1, -1], [1, -1], [-1, 1]]])], 4, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_public_entry_uses_triton_on_cuda():
    scene = _random_scene(3, torch.float32, 4, 200)
    public, fast = rasterize(*scene, 64, 48), rasterize_triton(*scene, 64, 48)
    for name in ("features", "soft_mask", "face_idx"):
        assert torch.equal(getattr(public, name), getattr(fast, name))


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernels run in this process")
def test_cpu_run_under_triton_interpreter():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).parents[1],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
