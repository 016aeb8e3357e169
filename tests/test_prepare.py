"""prepare_cub.py / prepare_market.py / prepare_ATR.py on small raw trees: results, idempotence, --check."""

import hashlib
import importlib.util
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.atr import ATRDataset, read_split_list, split_list_path
from datasets.cub import CUBDataset
from datasets.fixtures import write_atr_raw, write_cub_raw, write_market_tree
from datasets.market import MarketDataset
from datasets.prepare import cub_crop_box, fill_holes
from utils.cli import EXIT_EXPECTED, run_main

ROOT = Path(__file__).resolve().parents[1]
# (x, y, w, h) boxes in a 60 x 40 image. Crops (x - .1w, y - .1h, x + 1.1w, y + 1.1h), clamped, int:
# box 0 -> (18, 8, 42, 26): 24 x 18, mask 20 x 15 = 300 px -> ratio 300 / 432 = 0.69;
# box 1 -> (0, 0, 55, 38): 55 x 38, mask 50 x 35 = 1750 px -> ratio 1750 / 2090 = 0.84.
BOXES = [(20.0, 10.0, 20.0, 15.0), (0.0, 0.0, 50.0, 35.0)]


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(root):
    """Relative path -> content hash of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def run(name, argv, capsys):
    """Exit status and output of a prepare script, as its command line gives them (errors: one line, 2)."""
    code = run_main(script(name).main, [str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


# ----------------------------------------------------------------------------- CUB


def test_cub_crop_box_by_hand():
    assert cub_crop_box(BOXES[0], 60, 40) == (18, 8, 42, 26)
    assert cub_crop_box(BOXES[1], 60, 40) == (0, 0, 55, 38)


@pytest.fixture
def cub_raw(tmp_path):
    raw = tmp_path / "CUB_200_2011"
    write_cub_raw(raw, BOXES, train=[True, False])
    return raw


def test_prepare_cub_crops_names_and_is_idempotent(tmp_path, cub_raw, capsys):
    root = tmp_path / "CUB_Data"
    code, out = run("prepare_cub", ["--raw", cub_raw, "--root", root, "--archives", tmp_path], capsys)
    assert code == 0 and "2 pairs written, 0 already present" in out
    assert "train: 1 pairs, mean foreground ratio 0.690" in out
    train_dir, test_dir = root / "train" / "001.Alpha", root / "test" / "002.Beta"
    assert sorted(p.name for p in train_dir.iterdir()) == ["Bird_0001.jpg", "Bird_0001_0.69.png"]
    assert sorted(p.name for p in test_dir.iterdir()) == ["Bird_0002.jpg", "Bird_0002_0.84.png"]
    with Image.open(train_dir / "Bird_0001.jpg") as image:
        assert image.size == (24, 18)
    # The soft first mask row (grey 100) is in the ratio but not in the loader's > 160 mask.
    images = CUBDataset(root, "train", image_size=24, ratio=0.75)[0]["images"]
    assert images[3].sum().item() == 14 * 20

    before = snapshot(root)
    code, out = run("prepare_cub", ["--raw", cub_raw, "--root", root, "--archives", tmp_path], capsys)
    assert code == 0 and "0 pairs written, 2 already present" in out
    assert snapshot(root) == before


def test_prepare_cub_unpacks_archives(tmp_path, cub_raw, capsys):
    archives = tmp_path / "downloads"
    archives.mkdir()
    with tarfile.open(archives / "segmentations.tgz", "w:gz") as tf:
        tf.add(cub_raw / "segmentations", arcname="segmentations")
    with tarfile.open(archives / "CUB_200_2011.tgz", "w:gz") as tf:
        for name in ("images", "images.txt", "train_test_split.txt", "bounding_boxes.txt"):
            tf.add(cub_raw / name, arcname=f"CUB_200_2011/{name}")
    raw, root = tmp_path / "raw" / "CUB_200_2011", tmp_path / "CUB_Data"
    code, out = run("prepare_cub", ["--raw", raw, "--root", root, "--archives", archives], capsys)
    assert code == 0 and "unpacked" in out and "2 pairs written" in out
    assert (raw / "segmentations" / "001.Alpha" / "Bird_0001.png").is_file()


def offline(**kwargs):
    """gdown.download as it fails without network access."""
    raise ConnectionError("Failed to resolve the host (no network)")


def test_prepare_cub_missing_raw_and_download_offline(tmp_path, capsys, monkeypatch):
    code, out = run("prepare_cub", ["--raw", tmp_path / "nothing", "--root", tmp_path / "out",
                                    "--archives", tmp_path], capsys)
    assert code == EXIT_EXPECTED and "unpack CUB_200_2011.tgz" in out
    monkeypatch.setattr("gdown.download", offline)
    code, out = run("prepare_cub", ["--download", "--archives", tmp_path, "--root", tmp_path / "out"], capsys)
    assert code == EXIT_EXPECTED
    assert "downloading CUB_Data.zip (Google Drive id 1SkX_FWUfLOaTr371TBkQnDH9oDJ5Khwc) failed" in out
    assert f"save it as {tmp_path / 'CUB_Data.zip'}" in out and "caltech.edu" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial download left behind


def test_check_cub_reports_problems_without_changing_the_tree(tmp_path, cub_raw, capsys):
    root = tmp_path / "CUB_Data"
    run("prepare_cub", ["--raw", cub_raw, "--root", root, "--archives", tmp_path], capsys)
    code, out = run("prepare_cub", ["--check", "--root", root], capsys)
    assert code == 0 and "no problems found" in out and "train pairs: 1" in out

    train_dir, test_dir = root / "train" / "001.Alpha", root / "test" / "002.Beta"
    jpeg = (test_dir / "Bird_0002.jpg").read_bytes()
    (test_dir / "Bird_0002.jpg").write_bytes(jpeg[: len(jpeg) * 3 // 4])  # truncated
    (train_dir / "Bird_0001_0.69.png").rename(train_dir / "Bird_0001_0.50.png")  # wrong ratio in the name
    Image.new("RGB", (5, 5)).save(train_dir / "Bird_0003.jpg")  # image without a mask
    Image.new("L", (5, 5)).save(train_dir / "Bird_0004_0.00.png")  # mask without image
    Image.new("L", (5, 5)).save(test_dir / "Bird_0002_smooth.png")  # not a mask name
    before = snapshot(root)
    code, out = run("prepare_cub", ["--check", "--root", root], capsys)
    assert code == 1
    for problem in ("unreadable image (OSError): 1", "ratio in the name disagrees with the mask: 1",
                    "image without a mask: 1", "mask without its image: 1",
                    "PNG without a '_<ratio>.png' suffix (not a mask; run the prepare script): 1"):
        assert f"PROBLEM {problem}" in out
    assert snapshot(root) == before
    code, out = run("prepare_cub", ["--check", "--root", tmp_path / "missing"], capsys)
    assert code == 1 and "PROBLEM missing folder: 2" in out  # train/ and test/


# ----------------------------------------------------------------------------- Market


def test_prepare_market_unpacks_names_masks_and_checks(tmp_path, capsys, monkeypatch):
    # What the downloads would contain: hq/pytorch and hq/seg_hmr, masks without ratio suffix.
    source = tmp_path / "source" / "hq"
    write_market_tree(source, {"train": [0.2, 0.3], "test": [0.4]}, mask_size=(10, 20))
    for mask in source.glob("seg_hmr/*/*/*.png"):
        mask.rename(mask.with_name(mask.name[: -len("_0.20.png")] + ".png"))
    root = tmp_path / "Market"

    def fake_download(id, output, quiet):  # noqa: A002 - gdown's keyword names
        with zipfile.ZipFile(output, "w") as zf:
            folder = "pytorch" if id == "images-id" else "seg_hmr"
            for path in (source / folder).rglob("*"):
                zf.write(path, Path("hq") / path.relative_to(source))
        return output

    monkeypatch.setattr("gdown.download", fake_download)
    code, out = run("prepare_market", ["--root", root, "--download", "--drive_id", "Market-HQ.zip=images-id",
                                       "--drive_id", "Market-Seg-HMR.zip=masks-id"], capsys)
    assert code == 0, out
    assert "3 masks given a ratio name, 0 already named" in out
    assert "train (train_all): 2 pairs, mean foreground ratio 0.250" in out
    masks = sorted(p.name for p in (root / "seg_hmr").glob("*/*/*.png"))
    assert masks == ["0002_c1s1_test_0000.jpg_0.40.png", "0002_c1s1_train_0000.jpg_0.20.png",
                     "0002_c1s1_train_0001.jpg_0.30.png"]
    assert len(MarketDataset(root, "train")) == 2

    before = snapshot(root)
    code, out = run("prepare_market", ["--root", root], capsys)
    assert code == 0 and "0 masks given a ratio name, 3 already named" in out
    assert snapshot(root) == before

    code, out = run("prepare_market", ["--check", "--root", root], capsys)
    assert code == 0 and "no problems found" in out
    next((root / "pytorch" / "query").glob("*/*.png")).unlink()
    code, out = run("prepare_market", ["--check", "--root", root], capsys)
    assert code == 1 and "PROBLEM mask without its image: 1" in out and "PROBLEM empty split: 1" in out


def test_prepare_market_bad_drive_id_argument(tmp_path, capsys, monkeypatch):
    code, out = run("prepare_market", ["--root", tmp_path, "--download", "--drive_id", "nonsense"], capsys)
    assert code == EXIT_EXPECTED and "--drive_id expects NAME=ID" in out
    monkeypatch.setattr("gdown.download", offline)
    code, out = run("prepare_market", ["--root", tmp_path, "--download"], capsys)
    assert code == EXIT_EXPECTED
    assert "downloading Market-HQ.zip (Google Drive id 10gNi3n8Iny4O4MOZRs5dNFICfj8ri9eW) failed" in out


# ----------------------------------------------------------------------------- ATR


def naive_fill_holes(mask, iterations=5):
    """The original rule, one pixel at a time: m <- m + mean3x3(m) > 4/9, with m = 255 * mask first."""
    m = mask.astype(np.float64) * 255.0
    height, width = m.shape
    for _ in range(iterations):
        padded = np.pad(m, 1)
        new = np.zeros_like(m)
        for y in range(height):
            for x in range(width):
                new[y, x] = 1.0 if m[y, x] + padded[y:y + 3, x:x + 3].sum() / 9.0 > 4.0 / 9.0 else 0.0
        m = new
    return m > 0


def test_fill_holes_by_hand_and_against_the_naive_rule():
    single = np.zeros((7, 7), bool)
    single[3, 3] = True
    expected = np.zeros((7, 7), bool)
    expected[2:5, 2:5] = True  # dilation; no pixel outside has 5 foreground neighbours
    assert np.array_equal(fill_holes(single), expected)
    # Two pixels 4 apart: dilation gives two 3x3 blocks (columns 1-3 and 5-7) with a gap at column 4.
    # Iteration 2 fills (2, 4) (6 foreground neighbours); iteration 3 fills (1, 4) and (3, 4), whose
    # neighbours are then 5; nothing else ever has 5.
    pair = np.zeros((5, 9), bool)
    pair[2, 2] = pair[2, 6] = True
    blocks = np.zeros((5, 9), bool)
    blocks[1:4, 1:4] = blocks[1:4, 5:8] = True
    assert np.array_equal(fill_holes(pair, iterations=1), blocks)
    blocks[2, 4] = True
    assert np.array_equal(fill_holes(pair, iterations=2), blocks)
    bridged = np.zeros((5, 9), bool)
    bridged[1:4, 1:8] = True
    assert np.array_equal(fill_holes(pair), bridged)
    rng = np.random.default_rng(0)
    for density in (0.05, 0.1, 0.2):
        mask = rng.random((16, 20)) < density
        assert np.array_equal(fill_holes(mask), naive_fill_holes(mask))


def test_prepare_atr_masks_lists_idempotence_and_check(tmp_path, capsys):
    root = tmp_path / "ATR"
    stems = [f"2500_{n}" for n in range(1, 21)] + [f"fash_{n}" for n in range(1, 11)]
    write_atr_raw(root, stems)
    code, out = run("prepare_ATR", ["--root", root], capsys)
    assert code == 0, out
    assert "30 masks written, 0 already present" in out
    # Partial prefixes: 2500 keeps round(20 * 228 / 2476) = 2 test stems, fash round(10 * 50 / 685) = 1.
    assert "split lists written: train 27, test 3" in out
    assert read_split_list(split_list_path(root, "test")) == ["2500_6", "2500_16", "fash_6"]  # positions 5, 15; 5
    mask_path = next((root / "Seg").glob("2500_1_*.png"))
    with Image.open(root / "SegmentationClassAug" / "2500_1.png") as labels:
        person = np.asarray(labels) > 0
    expected = naive_fill_holes(person)
    assert np.array_equal(np.asarray(Image.open(mask_path)) > 0, expected)
    assert mask_path.name == f"2500_1_{expected.mean():.2f}.png"
    assert not person.all() and expected[~person].any()  # the one-pixel hole got filled
    ds = ATRDataset(root, "train")
    assert len(ds) == 27 and ds[0]["images"].shape == (4, 160, 96)

    before = snapshot(root)
    code, out = run("prepare_ATR", ["--root", root], capsys)
    assert code == 0 and "0 masks written, 30 already present" in out and "already present, kept" in out
    assert snapshot(root) == before

    code, out = run("prepare_ATR", ["--check", "--root", root], capsys)
    assert code == 0 and "no problems found" in out and "test pairs: 3" in out
    mask_path.unlink()
    split_list_path(root, "test").write_text("2500_6\n2500_16\nfash_6\n2500_2\n")
    code, out = run("prepare_ATR", ["--check", "--root", root], capsys)
    assert code == 1
    assert "PROBLEM listed stem without a Seg mask: 1" in out
    assert "PROBLEM parsing map without a Seg mask (run prepare_ATR.py): 1" in out
    assert "PROBLEM stem listed twice (train and test): 1" in out


def test_prepare_atr_without_data(tmp_path, capsys):
    code, out = run("prepare_ATR", ["--root", tmp_path / "ATR"], capsys)
    assert code == EXIT_EXPECTED and "SegmentationClassAug is missing" in out
