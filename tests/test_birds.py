"""Bird dataset: meshes, determinism, cache, loader, and the ground truth against the rendered masks."""

import hashlib
import json
import sys

import numpy as np
import pytest
import torch

import datasets.birds as birds
from datasets import build_dataset
from datasets.birds import (
    GT_FILE,
    MANIFEST,
    BirdsDataset,
    BirdSpecies,
    bird_mesh,
    bird_profile,
    ensure_birds,
    frame_cameras,
    tube_faces,
)
from renderer.camera import FOVY_RAD, camera_transform, perspective_projection, project, world_to_camera
from renderer.mesh import flip_index, unique_edges
from renderer.render import render

TINY = dict(num_train=6, num_test=3, image_size=32, seed=0, num_classes=3, spp=4)
MASK_IOU_MIN = 0.97
"""Every ground-truth mesh, projected through our camera model, covers its 64x64 Mitsuba mask with at
least this IoU (measured 0.981-0.996 on the test's six images; the rest are edge pixels, where a 16-sample
coverage estimate and the rasterizer's pixel-centre rule disagree). 10 degrees of azimuth off: 0.82-0.90."""


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return ensure_birds(tmp_path_factory.mktemp("birds"), **TINY)


def random_birds(count, seed=0):
    rng = np.random.default_rng(seed)
    species = [BirdSpecies.draw(rng) for _ in range(3)]
    return np.stack([bird_mesh(bird_profile(species[i % 3].instance(rng)))[0] for i in range(count)])


def test_meshes_are_closed_genus_0_outward_and_mirror_symmetric():
    faces = torch.from_numpy(tube_faces())
    for verts in random_birds(6):
        verts = torch.from_numpy(verts)
        edges = unique_edges(faces)
        assert len(verts) - len(edges) + len(faces) == 2  # Euler characteristic of a sphere
        directed = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        assert len(torch.unique(directed, dim=0)) == len(directed) == 2 * len(edges)  # closed, consistently wound
        tri = verts[faces]
        volume = torch.einsum("fi,fi->f", tri[:, 0], torch.linalg.cross(tri[:, 1], tri[:, 2])).sum() / 6
        assert volume > 0.05  # outward normals
        flip = flip_index(verts)
        torch.testing.assert_close(verts[flip], verts * torch.tensor([1.0, 1.0, -1.0], dtype=verts.dtype))
        assert torch.equal(flip[flip], torch.arange(len(verts)))
        torch.testing.assert_close(verts.mean(0)[:2], torch.zeros(2, dtype=verts.dtype), atol=1e-9, rtol=0)
        assert verts[:, 0].max() - verts[:, 0].min() == pytest.approx(birds.BIRD_LENGTH)
        # Front and back: the beak tip (vertex 1) is the front-most point, the tail tip (vertex 0) the rearmost.
        assert verts[1, 0] == verts[:, 0].max() and verts[0, 0] == verts[:, 0].min()


def test_species_differ_and_instances_jitter_around_their_species():
    rng = np.random.default_rng(0)
    a, b = BirdSpecies.draw(rng), BirdSpecies.draw(rng)
    assert a.colours != b.colours and a.beak_length != b.beak_length
    instance = a.instance(rng)
    assert instance.beak_length != a.beak_length
    assert abs(instance.beak_length / a.beak_length - 1) <= birds.JITTER


def test_framing_centres_the_bird_and_sets_the_margin():
    verts = torch.from_numpy(random_birds(4))
    azimuth = torch.tensor([0.0, 30.0, 150.0, -20.0], dtype=torch.float64)
    elevation = torch.tensor([10.0, 20.0, 5.0, 25.0], dtype=torch.float64)
    margin = torch.tensor([0.1, 0.05, 0.15, 0.1], dtype=torch.float64)
    distance, offset = frame_cameras(verts, azimuth, elevation, margin, (1.5, 7.0), 0.5)
    ndc = project(world_to_camera(verts, camera_transform(azimuth, elevation, distance, offset)),
                  perspective_projection(FOVY_RAD, 1.0, dtype=torch.float64))
    lo, hi = ndc.amin(1), ndc.amax(1)
    torch.testing.assert_close((lo + hi) / 2, torch.zeros(4, 2, dtype=torch.float64), atol=2e-3, rtol=0)
    torch.testing.assert_close(((hi - lo) / 2).amax(1), 1 / (1 + 2 * margin), atol=2e-3, rtol=0)
    # The distance range wins over the margin: pinned at its near end, the bird gets smaller.
    far, _ = frame_cameras(verts, azimuth, elevation, margin, (6.0, 7.0), 0.5)
    assert torch.all(far == 6.0)


def test_layout_and_manifest(tiny_root):
    manifest = json.loads((tiny_root / MANIFEST).read_text())
    assert manifest["num_train"] == 6 and manifest["image_size"] == 32 and manifest["spp"] == 4
    assert "mitsuba" in manifest
    train = sorted(p.relative_to(tiny_root / "train").as_posix() for p in (tiny_root / "train").rglob("*.*")
                   if p.suffix in (".jpg", ".png"))
    assert len(train) == 12 and {name.split("/")[0] for name in train} == {"000", "001", "002"}
    assert "000/train_000000.jpg" in train and sum(n.startswith("000/train_000000_") for n in train) == 1
    gt = np.load(tiny_root / "train" / GT_FILE)
    num_verts = 2 + birds.NUM_RINGS * birds.NUM_AROUND
    assert gt["verts"].shape == (6, num_verts, 3) and gt["faces"].shape == (2 * num_verts - 4, 3)
    assert gt["offset"].shape == (6, 2) and gt["light_direction"].shape == (6, 3)
    assert np.all(gt["distance"] >= 2.0) and np.all(np.abs(gt["offset"]) <= 0.3 + 1e-6)
    assert np.all((gt["elevation_deg"] >= 0) & (gt["elevation_deg"] <= 30))


def test_deterministic_from_seed_and_test_split_independent_of_train_size(tmp_path, tiny_root):
    again = ensure_birds(tmp_path / "again", **TINY)
    assert snapshot(again) == snapshot(tiny_root)
    fewer = ensure_birds(tmp_path / "fewer", **{**TINY, "num_train": 2})
    test_files = {k: v for k, v in snapshot(tiny_root).items() if k.startswith("test/")}
    assert {k: v for k, v in snapshot(fewer).items() if k.startswith("test/")} == test_files
    other_seed = ensure_birds(tmp_path / "seed1", **{**TINY, "seed": 1})
    assert snapshot(other_seed)["test/gt.npz"] != snapshot(tiny_root)["test/gt.npz"]


def test_cache_is_reused_or_replaced(tmp_path, monkeypatch):
    root = ensure_birds(tmp_path / "cache", **{**TINY, "num_train": 2})
    before = snapshot(root)

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated a valid cache")

    with monkeypatch.context() as m:
        m.setattr(birds, "generate_split", must_not_run)
        ensure_birds(root, **{**TINY, "num_train": 2})
    assert snapshot(root) == before
    # Made by another Mitsuba version, or read where Mitsuba is not installed (a GPU node): reused.
    manifest = json.loads((root / MANIFEST).read_text())
    (root / MANIFEST).write_text(json.dumps({**manifest, "mitsuba": "0.0.1"}))
    with monkeypatch.context() as m:
        m.setattr(birds, "generate_split", must_not_run)
        m.setitem(sys.modules, "mitsuba", None)  # importing it fails
        ensure_birds(root, **{**TINY, "num_train": 2})
    ensure_birds(root, **{**TINY, "num_train": 1, "spp": 2})
    assert len(list((root / "train").rglob("*.jpg"))) == 1
    assert json.loads((root / MANIFEST).read_text())["spp"] == 2


def test_ground_truth_projected_by_our_camera_reproduces_the_rendered_masks(tmp_path):
    """The ground truth's honesty: our camera model and rasterizer, given the stored mesh and camera,
    cover the mask Mitsuba rendered; a camera 10 degrees off does not."""
    root = ensure_birds(tmp_path / "b64", num_train=1, num_test=6, image_size=64, seed=3)
    dataset = BirdsDataset(root, "test", image_size=64)
    items = [dataset[i] for i in range(len(dataset))]
    verts = torch.stack([item["verts"] for item in items])
    faces = torch.from_numpy(np.load(root / "test" / GT_FILE)["faces"])
    masks = torch.stack([item["images"][3] for item in items]) > 0.5

    def iou(azimuth_shift):
        cam = {k: torch.stack([torch.as_tensor(item[k]) for item in items])
               for k in ("azimuth_deg", "elevation_deg", "distance", "offset")}
        out = render(verts, faces, torch.zeros(len(faces), 3, 2), cam["azimuth_deg"] + azimuth_shift,
                     cam["elevation_deg"], cam["distance"], cam["offset"], torch.ones(len(items), 3, 2, 2),
                     torch.zeros(len(items), 9), 64, 64)
        ours = out.face_idx >= 0
        return (ours & masks).flatten(1).sum(1) / (ours | masks).flatten(1).sum(1)

    assert iou(0.0).min() >= MASK_IOU_MIN
    assert iou(10.0).max() < MASK_IOU_MIN - 0.04


def test_loader_items_and_errors(tiny_root, tmp_path):
    gt = np.load(tiny_root / "test" / GT_FILE)
    dataset = build_dataset("birds", tiny_root, "test", image_size=32, ratio=1.0, threshold=None, aug=False, bg=True)
    assert len(dataset) == 3
    item = dataset[0]
    row = list(gt["stems"]).index("test_000000")
    assert item["images"].shape == (4, 32, 32) and item["label"] == 0
    torch.testing.assert_close(item["verts"], torch.from_numpy(gt["verts"][row]))
    torch.testing.assert_close(item["offset"], torch.from_numpy(gt["offset"][row]))
    verts, faces = dataset.mesh(0)
    torch.testing.assert_close(verts, item["verts"])
    assert torch.equal(faces, torch.from_numpy(gt["faces"])) and torch.equal(item["faces"], faces)
    # The mask is the stored one; with bg=True the RGB keeps the rendered background.
    assert 0.05 < item["images"][3].mean() < 0.9 and item["images"][:3][:, item["images"][3] == 0].std() > 0.01
    larger = BirdsDataset(tiny_root, "test", image_size=64)[0]  # a resize of the whole frame: same camera
    assert larger["images"].shape == (4, 64, 64) and larger["azimuth_deg"] == item["azimuth_deg"]
    augmented = BirdsDataset(tiny_root, "train", image_size=32, aug=True)[0]
    assert "verts" not in augmented and "faces" not in augmented
    with pytest.raises(ValueError, match="square"):
        BirdsDataset(tiny_root, "test", ratio=2.0)
    with pytest.raises(FileNotFoundError, match="ensure_birds"):
        BirdsDataset(tmp_path / "missing", "test")


@pytest.mark.parametrize("original_crop", [False, True])
def test_birds_train_split_is_read_as_the_original_read_cub(tiny_root, crop_box_calls, original_crop):
    # The original's CUB loader: each training image twice per epoch, the random crop drawn its way.
    seen = crop_box_calls
    train = build_dataset("birds", tiny_root, "train", 32, 1.0, None, aug=True, bg=False, original_crop=original_crop)
    images = TINY["num_train"]
    assert len(train) == 2 * images and train[images]["path"] == train[0]["path"]
    assert seen == [original_crop, original_crop]
    once = build_dataset("birds", tiny_root, "train", 32, 1.0, None, aug=True, bg=False, train_repeats=1)
    test = build_dataset("birds", tiny_root, "test", 32, 1.0, None, aug=False, bg=False, train_repeats=3)
    assert len(once) == images and len(test) == TINY["num_test"]
