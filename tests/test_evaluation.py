"""Evaluation, gifs and single-image reconstruction: metric identities and hand values, FID math,
and test.py / show_rainbow2.py / demo.py end to end on a checkpoint of a tiny synthetic run."""

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from torchvision.models.inception import InceptionA

import demo
import show_rainbow2
from networks import Attributes
from networks.losses import chamfer_distance
from renderer.mesh import Template
from renderer.render import render
from renderer.shading import mask_iou
from utils.checkpoints import load_checkpoint
from utils.cli import EXIT_EXPECTED, run_main
from utils.metrics import (
    FIDInception,
    centred,
    count_flops,
    count_parameters,
    encoder_complexity,
    evaluate,
    feature_statistics,
    fid_from_features,
    frame_alignment,
    frechet_distance,
    load_fid_inception,
    rotate_y,
    scale_to,
    scaled_like,
    ssim,
    surface_radius,
)
from utils.model import load_run, render_attributes
from utils.options import parse_options
from utils.trainer import train
from utils.visualization import azimuth_sweep, distance_sweep, elevation_sweep, offset_sweep

NUM_TEST = 4
SIZE = 64


def _load_test_script():
    # By path: `import test` could find the standard library's `test` package instead.
    spec = importlib.util.spec_from_file_location("evaluation_script", Path(__file__).parents[1] / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluation_script = _load_test_script()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One epoch of one step on 4 synthetic images: a real checkpoint (with SWA weights) to evaluate."""
    root = tmp_path_factory.mktemp("evaluation")
    args = ["--dataset", "synthetic", "--imageSize", str(SIZE), "--batchSize", "4", "--synthetic_train", "4",
            "--synthetic_test", str(NUM_TEST), "--workers", "0", "--device", "cpu", "--niter", "1",
            "--elev_range", "0~30", "--dist_range", "2~7",  # CUB's, whose gif frame counts the spec gives
            "--dataroot", str(root / "data"), "--log_root", str(root / "log"), "--name", "tiny"]
    train(parse_options(args, {}))
    log_root = root / "log"
    return SimpleNamespace(log_root=str(log_root), dir=log_root / "tiny", data=root / "data")


def run_flags(run, *extra):
    return ["--name", "tiny", "--log_root", run.log_root, "--device", "cpu", *extra]


def last_line(path):
    return json.loads(path.read_text().splitlines()[-1])


# ----------------------------------------------------------------------------- metrics


def test_mask_iou_identities_and_hand_values():
    mask = (torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    assert torch.allclose(mask_iou(mask, mask), torch.ones(2))
    assert torch.equal(mask_iou(mask, 1 - mask), torch.zeros(2))
    pred, target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]), torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    assert mask_iou(pred, target).item() == pytest.approx(1 / 3)  # 1 shared pixel of 3 covered
    # soft: 0.5 on a full target -> intersection 0.5 n, union n
    assert mask_iou(torch.full((1, 4, 4), 0.5), torch.ones(1, 4, 4)).item() == pytest.approx(0.5)


def test_ssim_of_an_image_with_itself_is_one_at_every_scale():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for upscale in (1, 2):
        assert torch.allclose(ssim(x, x, upscale=upscale), torch.ones(2), atol=1e-6)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert (ssim(x, noisy) < 0.9).all()


def test_flops_of_single_layers_match_the_hand_count():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    # each of the 8x10x10 outputs is 3x3x3 multiply-adds, 2 FLOPs each (the bias is not counted)
    assert count_flops(conv, torch.rand(1, 3, 10, 10)) == 2 * 8 * 10 * 10 * 27
    assert count_parameters(conv) == 8 * 27 + 8
    assert count_flops(torch.nn.Linear(5, 7), torch.rand(2, 5)) == 2 * 2 * 5 * 7


def test_chamfer_of_a_mesh_with_itself_is_zero_and_of_two_points_the_squared_distance_twice():
    verts = centred(Template.icosphere().verts[None])
    assert chamfer_distance(verts, verts).item() == 0.0
    # the scale-aligned variant forgives a uniform scale (a larger object further away looks the same)
    assert chamfer_distance(scaled_like(2.5 * verts, verts), verts).item() == pytest.approx(0.0, abs=1e-12)
    a, b = torch.zeros(1, 1, 3), torch.tensor([[[0.0, 0.0, 2.0]]])
    assert chamfer_distance(a, b).item() == pytest.approx(8.0)  # 4 each way


def test_a_turned_object_seen_from_the_turned_azimuth_looks_the_same():
    template = Template.icosphere(subdivisions=2)
    verts = template.verts * torch.tensor([1.0, 0.8, 0.5]) + 0.3 * template.verts[:, :1].clamp_min(0) ** 2

    def silhouette(v, azimuth):
        return render(v[None], template.faces, template.face_uvs, torch.tensor([azimuth]), torch.tensor([20.0]),
                      torch.tensor([3.0]), torch.zeros(1, 2), torch.full((1, 3, 8, 8), 0.5),
                      torch.zeros(1, 9), 32, 32).silhouette

    seen = silhouette(verts, 30.0)
    assert torch.allclose(silhouette(rotate_y(verts, 50.0), 80.0), seen, atol=1e-4)
    assert not torch.allclose(silhouette(verts, 80.0), seen, atol=1e-2)


def test_surface_radius_weighs_the_surface_not_the_vertices():
    verts = torch.tensor([[x, y, z] for x in (-1.0, 1.0) for y in (-1.0, 1.0) for z in (-1.0, 1.0)])
    faces = torch.tensor([[0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3], [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6],
                          [0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5]])  # two triangles a face of the cube
    # The surface of the cube [-1, 1]^3: each face holds (4/3 + 4/3 + 4) of squared distance on 4 of area.
    assert surface_radius(verts[None], faces).item() == pytest.approx((5 / 3) ** 0.5, rel=1e-6)
    # The same cube with a vertex added at the centre of its +z face (a fan of four triangles there).
    top = [f for f in faces.tolist() if all(verts[i, 2] > 0 for i in f)]
    rim = [i for i in range(8) if verts[i, 2] > 0]
    fan = [[8, a, b] for a, b in [(rim[0], rim[1]), (rim[1], rim[3]), (rim[3], rim[2]), (rim[2], rim[0])]]
    more = torch.cat([verts, torch.tensor([[0.0, 0.0, 1.0]])])
    more_faces = torch.tensor([f for f in faces.tolist() if f not in top] + fan)
    assert surface_radius(more[None], more_faces).item() == pytest.approx((5 / 3) ** 0.5, rel=1e-5)
    assert surface_radius(2 * more[None], more_faces).item() == pytest.approx(2 * (5 / 3) ** 0.5, rel=1e-5)
    # Sizes from the surfaces: exactly the factor 2; from the vertices, off (one vertex crowds the centre).
    assert scale_to(2 * verts[None], more[None], faces, more_faces).item() == pytest.approx(0.5, rel=1e-5)
    assert scale_to(2 * verts[None], more[None]).item() != pytest.approx(0.5, rel=1e-2)


@pytest.mark.parametrize("with_faces", [False, True])
def test_a_larger_object_further_away_looks_the_same_and_its_scale_aligned_distance_error_is_zero(with_faces):
    template = Template.icosphere(subdivisions=2)
    verts = (template.verts * torch.tensor([1.0, 0.8, 0.5])).expand(2, -1, -1)
    truth = Attributes(azimuth_deg=torch.tensor([30.0, -60.0]), elevation_deg=torch.tensor([20.0, 10.0]),
                       distance=torch.tensor([3.0, 4.0]), offset=torch.tensor([[0.1, -0.1], [0.0, 0.2]]),
                       verts=verts, delta_verts=verts - template.verts, texture=torch.full((2, 3, 16, 8), 0.6),
                       light=torch.zeros(2, 9))
    # Everything scaled by 2 about the world origin: the object, the camera distance and the look-at point.
    larger = replace(truth, verts=2 * verts, delta_verts=2 * verts - template.verts, distance=2 * truth.distance,
                     offset=2 * truth.offset)
    seen = render_attributes(truth, template, 32, 32)
    assert torch.allclose(render_attributes(larger, template, 32, 32).silhouette, seen.silhouette, atol=1e-4)

    class PredictsLarger(torch.nn.Module):
        def forward(self, images, mode):
            return larger

    batch = {"images": torch.cat([seen.rgb, seen.silhouette], dim=1), "verts": verts,
             "azimuth_deg": truth.azimuth_deg, "elevation_deg": truth.elevation_deg, "distance": truth.distance,
             "offset": truth.offset}
    if with_faces:  # as the birds' items carry them: sizes compared on the surfaces
        batch["faces"] = template.faces.expand(2, -1, -1)
    metrics = evaluate(PredictsLarger(), [batch], template, 32, 32, "cpu")
    assert metrics["distance_err"] == pytest.approx(3.5)  # (3 + 4) / 2: twice as far
    assert metrics["distance_err_scaled"] == pytest.approx(0.0, abs=1e-5)  # at the true size, right
    assert metrics["chamfer_scaled"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["offset_err"] == pytest.approx(float(truth.offset.norm(dim=1).mean()), rel=1e-5)


def test_frame_alignment_finds_the_one_turn_of_the_whole_split():
    template = Template.icosphere(subdivisions=2)
    generator = torch.Generator().manual_seed(0)
    head = 0.4 * template.verts[:, :1].clamp_min(0) ** 2  # an asymmetry along x fixes the turn
    gt = centred(torch.stack([template.verts * (1 + 0.2 * torch.rand(3, generator=generator)) + head
                              for _ in range(6)]))
    gt_az = torch.rand(6, generator=generator) * 360 - 180
    turned = frame_alignment(rotate_y(gt, 135.0), gt, gt_az + 135.0, gt_az)
    assert turned["frame_turn_deg"] == 135.0
    assert turned["chamfer_aligned"] == pytest.approx(0.0, abs=1e-10)
    assert turned["chamfer_scaled_aligned"] == pytest.approx(0.0, abs=1e-10)
    assert turned["azimuth_err_aligned_deg"] == pytest.approx(0.0, abs=1e-3)
    # twice as large and cameras 10 degrees off: only the scale-aligned Chamfer forgives the size
    off = frame_alignment(2 * gt, gt, gt_az + 10.0, gt_az)
    assert off["frame_turn_deg"] == 0.0 and off["azimuth_err_aligned_deg"] == pytest.approx(10.0, abs=1e-3)
    assert off["chamfer_scaled_aligned"] == pytest.approx(0.0, abs=1e-10)
    assert off["chamfer_aligned"] == pytest.approx(chamfer_distance(2 * gt, gt).item(), rel=1e-5)


def test_frechet_distance_closed_forms():
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2 = 5 + (1 - 2)^2 + (2 - 3)^2
    value = frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 2.0]), np.diag([4.0, 9.0]))
    assert value == pytest.approx(7.0)
    # rotated (non-diagonal) covariances of the same spectra: the distance does not change
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s], [s, c]])
    sigma1, sigma2 = (rotation @ np.diag(v) @ rotation.T for v in ([1.0, 4.0], [4.0, 9.0]))
    assert frechet_distance(np.zeros(2), sigma1, np.array([1.0, 2.0]), sigma2) == pytest.approx(7.0)
    features = np.random.default_rng(0).normal(size=(200, 3))
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5])
    assert fid_from_features(features, features + shift) == pytest.approx(shift @ shift, rel=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        fid_from_features(features[:1], features)


def test_frechet_distance_matches_the_matrix_square_root_form():
    linalg = pytest.importorskip("scipy.linalg", reason="scipy is the reference, not a dependency")
    rng = np.random.default_rng(1)
    for samples in (50, 4):  # full-rank and singular (rank 3) 6x6 covariances
        a, b = rng.normal(size=(samples, 6)), rng.normal(size=(samples, 6)) * 2 + 1
        (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
        reference = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)


def test_fid_inception_pools_like_the_tf_graph():
    """The FID blocks differ from torchvision's only in the pooling branch: the same inside the image,
    not on its border (averages over valid pixels only); the output is the 2048-d pool3 feature."""
    model = FIDInception()
    reference = InceptionA(192, pool_features=32).eval()
    reference.load_state_dict(model.Mixed_5b.state_dict())
    x = torch.rand(1, 192, 7, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.Mixed_5b(x), reference(x)
    branches = slice(0, 224)  # 64 + 64 + 96 channels of the convolution branches
    assert torch.equal(ours[:, branches], theirs[:, branches])
    assert torch.allclose(ours[:, 224:, 1:-1, 1:-1], theirs[:, 224:, 1:-1, 1:-1], atol=1e-6)
    assert not torch.allclose(ours[:, 224:, 0], theirs[:, 224:, 0])
    with torch.no_grad():
        assert model(torch.rand(2, 3, 40, 30)).shape == (2, 2048)


def test_fid_inception_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception"):
        load_fid_inception(tmp_path / "missing.pth")
    torch.save(torch.nn.Conv2d(1, 1, 1).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="pt_inception"):
        load_fid_inception(tmp_path / "other.pth")


def test_encoder_complexity_parts_add_up_to_the_total(run):
    encoder = load_run(run.dir).encoder
    complexity = encoder_complexity(encoder, SIZE, SIZE)
    parts = [v for k, v in complexity.items() if k != "total"]
    assert set(complexity) == {"camera", "shape", "texture", "light", "total"}  # no --bg: no background
    assert all(p["flops"] > 0 and p["params"] > 0 for p in parts)
    assert sum(p["flops"] for p in parts) == complexity["total"]["flops"]
    assert sum(p["params"] for p in parts) == complexity["total"]["params"] == count_parameters(encoder)


# ----------------------------------------------------------------------------- sweeps


def test_camera_sweeps_frame_counts_and_values():
    attrs = SimpleNamespace(azimuth_deg=torch.tensor([10.0, -30.0]), offset=torch.full((2, 2), 0.2))
    turns = azimuth_sweep(attrs)
    assert len(turns) == 36
    assert torch.equal(turns[0]["azimuth_deg"], attrs.azimuth_deg)  # starts at the reconstruction
    assert torch.equal(turns[1]["azimuth_deg"], attrs.azimuth_deg - 10)
    assert len(azimuth_sweep(attrs, azi_scope=180)) == 18
    elevations = [f["elevation_deg"][0].item() for f in elevation_sweep(attrs, (0.0, 30.0))]
    assert elevations == [0, 5, 10, 15, 20, 25]
    assert len(elevation_sweep(attrs, (-15.0, 15.0))) == 6
    assert len(elevation_sweep(attrs, (10.0, 10.0))) == 1
    distances = [f["distance"][1].item() for f in distance_sweep(attrs, (2.0, 7.0))]
    assert distances == [2.0 + 0.5 * k for k in range(12)]
    assert len(distance_sweep(attrs, (2.0, 6.0))) == 10
    shifts = offset_sweep(attrs)
    assert len(shifts) == 22
    assert all(torch.equal(f["azimuth_deg"], torch.zeros(2)) for f in shifts)
    assert shifts[0]["offset"][0].tolist() == pytest.approx([-0.5, 0.0])
    assert shifts[10]["offset"][0].tolist() == pytest.approx([0.5, 0.0])
    assert shifts[11]["offset"][0].tolist() == pytest.approx([0.0, -0.5])


# ----------------------------------------------------------------------------- test.py


def test_test_py_reproduces_the_training_evaluation_and_writes_a_json_line(run, capsys):
    in_training = last_line(run.dir / "metrics.jsonl")  # the evaluation that saved best.pt
    assert evaluation_script.main(run_flags(run, "--save-images")) == 0
    table = capsys.readouterr().out
    labels = ("mask IoU", "SSIM", "Chamfer", "azimuth error", "FID skipped", "GFLOPs", "multiply-add = 2")
    assert all(label in table for label in labels), table
    line = last_line(run.dir / "metrics.jsonl")
    assert line["source"] == "test.py" and line["checkpoint"] == str(run.dir / "ckpts" / "best.pt")
    assert line["epoch"] == load_checkpoint(run.dir / "ckpts" / "best.pt")["epoch"]
    assert line["num_images"] == NUM_TEST and line["input_size"] == [SIZE, SIZE]
    for key in ("mask_iou", "ssim", "chamfer", "chamfer_template", "azimuth_err_deg", "elevation_err_deg",
                "chamfer_aligned", "azimuth_err_aligned_deg"):
        assert line[key] == pytest.approx(in_training[key], rel=1e-5), key
    assert line["complexity"]["total"]["flops"] > 0
    assert "ssim_x2" not in line and "fid_recon" not in line  # synthetic data: no upscale; no weights
    written = sorted(p.name for p in (run.dir / "test_images").iterdir())
    assert len(written) == 3 * NUM_TEST and written[:3] == [f"00000_test_000000_{k}.png" for k in
                                                              ("input", "mask", "recon")]


def test_test_py_options_jpeg_upscale_swa_and_fid(run, tmp_path):
    weights = tmp_path / "pt_inception.pth"
    torch.save(FIDInception().state_dict(), weights)  # random weights: exercises the whole FID path
    args = run_flags(run, "--jpeg", "--ssim_upscale", "2", "--swa", "--inception", str(weights))
    assert evaluation_script.main(args) == 0
    line = last_line(run.dir / "metrics.jsonl")
    assert line["swa"] and line["jpeg"]
    assert 0.0 <= line["mask_iou"] <= 1.0 and -1.0 <= line["ssim_x2"] <= 1.0
    for key in ("fid_recon", "fid_rotation", "fid_rotation90"):
        assert np.isfinite(line[key]) and line[key] >= -1e-3, key


def test_test_py_refuses_unknown_runs_and_missing_checkpoints(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="--name"):
        evaluation_script.main(["--name", "nope", "--log_root", run.log_root, "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="train the run first"):
        evaluation_script.main(run_flags(run, "--checkpoint", str(tmp_path / "missing.pt")))
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(run.dir / "opts.yaml", untrained / "opts.yaml")
    with pytest.raises(FileNotFoundError, match="best.pt"):
        evaluation_script.main(["--name", "untrained", "--log_root", str(tmp_path), "--device", "cpu"])


# ----------------------------------------------------------------------------- show_rainbow2.py


def test_show_rainbow2_writes_the_five_gifs_and_the_meshes(run):
    assert show_rainbow2.main(run_flags(run)) == 0
    cell = SIZE + 4 + 20  # image, 2-px black border each side, 20-px white gutter
    rainbow_side = (NUM_TEST + 1) * cell + 20  # 4 images: a 5x5 grid
    row = (NUM_TEST * (SIZE + 2) + 2, SIZE + 4)  # 4 images in one row of the 4-column grid (W, H)
    expected = {  # file: (frames, height, width)
        "current_rainbow.gif": (36, rainbow_side, rainbow_side),
        "current_rotation.gif": (36, row[1], row[0]),
        "current_rotation_ele.gif": (6, row[1], row[0]),  # elevation 0~30, step 5
        "current_rotation_dist.gif": (12, row[1], row[0]),  # distance 2~7: 2, 2.5, ..., 7.5
        "current_rotation_XY.gif": (22, row[1], row[0]),
    }
    for name, shape in expected.items():
        frames = iio.imread(run.dir / name, index=None)
        assert frames.shape[:3] == shape, name
    for k in range(NUM_TEST):
        stem = run.dir / "meshes" / f"{k:02d}_test_{k:06d}"
        mesh = trimesh.load(stem.with_suffix(".obj"), process=False, maintain_order=True)
        assert mesh.vertices.shape == (642, 3) and mesh.faces.shape == (1280, 3)
        assert stem.with_suffix(".png").is_file()
    assert (run.dir / "meshes" / "template.obj").is_file()
    assert Image.open(run.dir / "current_recon.png").size == row


def test_show_rainbow2_image_selection():
    test_split = list(range(5))
    assert show_rainbow2.select(test_split, None, 32) == [0, 1, 2, 3, 4]
    assert show_rainbow2.select(test_split, None, 2) == [0, 1]
    assert show_rainbow2.select(test_split, [4, 1], 32) == [4, 1]
    with pytest.raises(ValueError, match="outside the test split"):
        show_rainbow2.select(test_split, [5], 32)


# ----------------------------------------------------------------------------- demo.py


def test_demo_reconstructs_an_rgba_image_and_an_image_with_a_mask(run, tmp_path):
    rgb = Image.open(run.data / "test" / "000" / "test_000000.png").convert("RGB")
    mask = Image.open(next((run.data / "test" / "000").glob("test_000000_*.png"))).convert("L")
    rgba = rgb.copy()
    rgba.putalpha(mask)
    rgba.save(tmp_path / "bird.png")
    rgb.save(tmp_path / "plain.jpg")
    mask.save(tmp_path / "plain_mask.png")

    assert demo.main(run_flags(run, str(tmp_path / "bird.png"), "--out", str(tmp_path / "out"))) == 0
    mesh = trimesh.load(tmp_path / "out" / "bird_mesh.obj", process=False, maintain_order=True)
    assert mesh.vertices.shape == (642, 3)
    assert (tmp_path / "out" / "bird_mesh.png").is_file() and (tmp_path / "out" / "bird_mesh.mtl").is_file()
    turntable = iio.imread(tmp_path / "out" / "bird_rotation.gif", index=None)
    assert turntable.shape[:3] == (36, SIZE, SIZE)  # one image: no grid border
    assert Image.open(tmp_path / "out" / "bird_recon.png").size == (SIZE, SIZE)

    args = run_flags(run, str(tmp_path / "plain.jpg"), "--mask", str(tmp_path / "plain_mask.png"))
    assert demo.main(args) == 0
    assert (run.dir / "demo" / "plain_mesh.obj").is_file()


def test_demo_bad_inputs(run, tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "plain.jpg")
    with pytest.raises(ValueError, match="--mask"):
        demo.main(run_flags(run, str(tmp_path / "plain.jpg")))
    Image.new("L", (20, 20), 255).save(tmp_path / "small_mask.png")
    with pytest.raises(ValueError, match="differs from image size"):
        demo.main(run_flags(run, str(tmp_path / "plain.jpg"), "--mask", str(tmp_path / "small_mask.png")))
    Image.new("L", (40, 30), 0).save(tmp_path / "empty_mask.png")
    with pytest.raises(ValueError, match="empty"):
        demo.main(run_flags(run, str(tmp_path / "plain.jpg"), "--mask", str(tmp_path / "empty_mask.png")))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        demo.main(run_flags(run, str(tmp_path / "missing.png")))


def test_a_non_image_for_demo_and_unreadable_checkpoints_for_test_py_are_one_line(run, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    assert run_main(demo.main, run_flags(run, str(tmp_path / "notes.png"))) == EXIT_EXPECTED
    assert capsys.readouterr().err.splitlines() == [
        f"demo.py: error: cannot identify image file '{tmp_path / 'notes.png'}'"]

    broken = tmp_path / "log" / "tiny"
    shutil.copytree(run.dir, broken)
    (broken / "ckpts" / "best.pt").write_bytes(b"")
    (broken / "ckpts" / "best.prev.pt").write_bytes(b"\x00" * 64)
    args = ["--name", "tiny", "--log_root", str(tmp_path / "log"), "--device", "cpu"]
    assert run_main(evaluation_script.main, args) == EXIT_EXPECTED
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith(f"test.py: error: neither generation of {broken / 'ckpts' / 'best.pt'} can be read")
    assert "Traceback" not in "\n".join(lines)


def test_padding_keeps_the_aspect_ratio_of_a_demo_image(tmp_path):
    """A wide image is padded (black, centred) to the square input, not stretched."""
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "wide.png")
    Image.new("L", (40, 20), 255).save(tmp_path / "wide_mask.png")
    images = demo.load_image(tmp_path / "wide.png", tmp_path / "wide_mask.png", 8, 8, bg=False)
    assert images.shape == (1, 4, 8, 8)
    assert images[0, 3, :2].sum() == 0 and images[0, 3, 6:].sum() == 0  # 10-px bands above and below
    assert torch.equal(images[0, 3, 2:6], torch.ones(4, 8))
    assert torch.equal(images[0, 1:3, 2:6], torch.zeros(2, 4, 8))  # red object (bicubic rings in R only)
    assert torch.equal(images[0, :3, :2], torch.ones(3, 2, 8))  # whitened padding
