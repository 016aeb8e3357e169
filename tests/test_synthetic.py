"""Synthetic dataset: determinism, cache reuse, ground-truth consistency, loader path."""

import hashlib
import json

import numpy as np
import pytest
import torch

import datasets.synthetic as synthetic
from datasets import build_dataset
from datasets.synthetic import (
    MANIFEST,
    ShapeFamilies,
    SyntheticConfig,
    SyntheticDataset,
    body_plan,
    ensure_synthetic,
    random_cameras,
    random_shapes,
    random_textures,
)
from renderer.camera import FOVY_RAD, camera_transform, perspective_projection, project, world_to_camera
from renderer.mesh import Template
from renderer.render import render

TINY = dict(num_train=8, num_test=4, image_size=32, ratio=1.0, seed=0)


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic"), **TINY)


def test_layout_and_manifest(tiny_root):
    manifest = json.loads((tiny_root / MANIFEST).read_text())
    assert manifest["num_train"] == 8 and manifest["image_size"] == 32 and manifest["seed"] == 0
    train = sorted(p.relative_to(tiny_root / "train").as_posix() for p in (tiny_root / "train").rglob("*.png"))
    assert len(train) == 16  # 8 images + 8 masks, in 4 class folders
    assert {name.split("/")[0] for name in train} == {"000", "001", "002", "003"}
    assert "000/train_000000.png" in train
    assert sum(name.startswith("000/train_000000_") for name in train) == 1  # its mask
    gt = np.load(tiny_root / "train" / "gt.npz")
    assert gt["verts"].shape == (8, 642, 3) and gt["offset"].shape == (8, 2) and gt["light"].shape == (8, 9)


def test_deterministic_from_seed_and_test_split_independent_of_train_size(tmp_path, tiny_root):
    again = ensure_synthetic(tmp_path / "again", **TINY)
    assert snapshot(again) == snapshot(tiny_root)
    other_seed = ensure_synthetic(tmp_path / "seed1", **{**TINY, "seed": 1})
    assert snapshot(other_seed)["test/gt.npz"] != snapshot(tiny_root)["test/gt.npz"]
    fewer = ensure_synthetic(tmp_path / "fewer", **{**TINY, "num_train": 4})
    test_files = {k: v for k, v in snapshot(tiny_root).items() if k.startswith("test/")}
    assert {k: v for k, v in snapshot(fewer).items() if k.startswith("test/")} == test_files


def test_cache_is_reused_or_replaced(tmp_path, monkeypatch):
    root = ensure_synthetic(tmp_path / "cache", **{**TINY, "num_train": 4})
    before = snapshot(root)

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated a valid cache")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "generate_split", must_not_run)
        ensure_synthetic(root, **{**TINY, "num_train": 4})
    assert snapshot(root) == before
    ensure_synthetic(root, **{**TINY, "num_train": 2})  # other parameters: replaced, nothing stale left
    assert len(list((root / "train").rglob("*.png"))) == 4
    assert json.loads((root / MANIFEST).read_text())["num_train"] == 2
    (root / MANIFEST).unlink()  # an interrupted generation leaves no manifest: redone
    ensure_synthetic(root, **{**TINY, "num_train": 2})
    assert (root / MANIFEST).is_file()


def test_runs_of_other_training_seeds_share_the_data_of_one_data_seed(tmp_path, monkeypatch):
    from utils.options import parse_options
    from utils.trainer import ensure_dataset

    def opts(*flags):
        return parse_options(["--dataset", "synthetic", "--dataroot", str(tmp_path / "data"), "--imageSize", "64",
                              "--synthetic_train", "4", "--synthetic_test", "2", *flags], {})

    ensure_dataset(opts("--manualSeed", "0"), torch.device("cpu"))
    before = snapshot(tmp_path / "data")
    with monkeypatch.context() as m:  # another training seed: the same cache, not regenerated
        m.setattr(synthetic, "generate_split", lambda *a, **k: pytest.fail("regenerated for --manualSeed 1"))
        ensure_dataset(opts("--manualSeed", "1"), torch.device("cpu"))
    assert snapshot(tmp_path / "data") == before
    ensure_dataset(opts("--data_seed", "1"), torch.device("cpu"))
    assert json.loads((tmp_path / "data" / MANIFEST).read_text())["seed"] == 1
    assert snapshot(tmp_path / "data")["test/gt.npz"] != before["test/gt.npz"]


def test_items_carry_consistent_ground_truth(tiny_root):
    ds = SyntheticDataset(tiny_root, "test", image_size=32, ratio=1.0)
    template = Template.icosphere()
    proj = perspective_projection(FOVY_RAD, 1.0)
    for i in range(len(ds)):
        item = ds[i]
        assert item["images"].shape == (4, 32, 32) and item["label"] == i % 4
        verts = item["verts"]
        # Front/back symmetric: mirroring through z = 0 maps the mesh onto itself.
        assert torch.equal(verts[template.flip_index], verts * torch.tensor([1.0, 1.0, -1.0]))
        assert (verts - template.verts).abs().max() <= 0.45 + 1e-6  # reachable by the offsets (0.5 tanh)
        assert -180 < item["azimuth_deg"] <= 180 and 0 <= item["elevation_deg"] <= 30
        assert 2 <= item["distance"] <= 7 and item["offset"].abs().max() <= 0.3
        assert 2.75 <= item["light"][0] <= 3.25 and item["light"][1:].abs().max() <= 0.1
        camera = [item[k][None] for k in ("azimuth_deg", "elevation_deg", "distance", "offset")]
        ndc = project(world_to_camera(verts[None], camera_transform(*camera)), proj)
        assert ndc.abs().max() <= 0.9
        # Re-rendering the ground truth reproduces the stored mask exactly.
        out = render(verts[None], template.faces, template.face_uvs, *camera, torch.full((1, 3, 64, 32), 0.5),
                     item["light"][None], 32, 32)
        assert torch.equal((out.face_idx[0] >= 0).float(), item["images"][3])
        assert item["images"][3].sum() > 0


def test_every_shape_has_the_shared_head_and_tail():
    template = Template.icosphere()
    directions = template.verts / template.verts.norm(dim=-1, keepdim=True)
    field = body_plan(directions)
    assert torch.equal(field[template.flip_index], field)  # keeps the shapes exactly z-symmetric
    head = torch.tensor([0.75, 0.6, 0.0]) / torch.tensor([0.75, 0.6, 0.0]).norm()
    # Largest at the vertex nearest the head direction: the head amplitude (0.55) plus a trace of the tail.
    assert field.argmax() == (directions @ head).argmax()
    assert 0.5 < field.max() <= 0.55 + 1e-3
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(256) % 8
    verts = random_shapes(template.verts, ShapeFamilies.draw(8, generator), labels, generator)
    rows = torch.arange(len(verts))
    front_y = verts[rows, verts[..., 0].argmax(dim=1), 1]  # height of each shape's front-most vertex
    back_y = verts[rows, verts[..., 0].argmin(dim=1), 1]
    # Whatever the family's own bumps, the front is raised (the head) and higher than the back.
    assert front_y.min() > 0.25
    assert (front_y > back_y).float().mean() > 0.95


def test_white_and_gradient_backgrounds(tmp_path, tiny_root):
    white = SyntheticDataset(tiny_root, "test", image_size=32)[0]["images"]
    assert torch.all(white[:3, white[3] == 0] == 1.0)
    root = ensure_synthetic(tmp_path / "gradient", **{**TINY, "num_train": 1, "num_test": 1},
                            background="gradient")
    kept = SyntheticDataset(root, "test", image_size=32, bg=True)[0]["images"]
    background = kept[:3, kept[3] == 0]
    assert background.max() < 1.0 and background.min() > 0.4  # light colours times the SH factor ~0.85
    whitened = SyntheticDataset(root, "test", image_size=32, bg=False)[0]["images"]
    assert torch.all(whitened[:3, whitened[3] == 0] == 1.0)


def test_loader_path_aug_and_errors(tmp_path, tiny_root):
    ds = build_dataset("synthetic", tiny_root, "train", 32, 1.0, "0.01,0.99", aug=True, bg=False)
    assert len(ds) == len(ds.samples)  # not doubled like CUB
    item = ds[0]
    assert set(item) == {"images", "path", "label"}  # augmented: no ground truth
    assert item["path"].endswith(".png")
    larger = SyntheticDataset(tiny_root, "train", image_size=64)[0]
    assert larger["images"].shape == (4, 64, 64) and "verts" in larger
    with pytest.raises(ValueError, match="ratio"):
        SyntheticDataset(tiny_root, "train", image_size=32, ratio=2.0)
    with pytest.raises(FileNotFoundError, match="ensure_synthetic"):
        SyntheticDataset(tmp_path / "none", "train")


@pytest.mark.parametrize("original_crop", [False, True])
def test_original_crop_reaches_the_synthetic_loader(tiny_root, crop_box_calls, original_crop):
    seen = crop_box_calls
    ds = build_dataset("synthetic", tiny_root, "train", 32, 1.0, None, aug=True, bg=False, original_crop=original_crop)
    ds[0]
    assert seen == [original_crop]


def test_textures_are_front_back_mirrored_and_cameras_can_fail():
    textures = random_textures(2, 6, 4, torch.Generator().manual_seed(0))
    assert textures.shape == (2, 3, 12, 4)
    assert torch.equal(textures[:, :, 6:], textures[:, :, :6].flip(2))
    config = SyntheticConfig(1, 1, 32, 1.0, 0, distance_range=(1.1, 1.2))
    verts = Template.icosphere().verts[None]
    with pytest.raises(RuntimeError, match="widen distance_range"):
        random_cameras(verts, config, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="distance_range"):
        SyntheticConfig(1, 1, 32, 1.0, 0, distance_range=(0.5, 2.0))
