"""Real-data loaders against small trees written in the real layouts (datasets/fixtures.py)."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets import build_dataset
from datasets.atr import SPLIT_COUNTS, ATRDataset, split_list_path, split_stems
from datasets.common import crop_box, parse_threshold, split_mask_name
from datasets.cub import CUBDataset
from datasets.fixtures import (
    BACKGROUND,
    FOREGROUND,
    block_mask,
    object_image,
    write_atr_tree,
    write_cub_tree,
    write_market_tree,
)
from datasets.market import MarketDataset

BOUNDARY_RATIOS = [0.10, 0.16, 0.17, 0.40, 0.63, 0.64, 0.70]
BG = torch.tensor(BACKGROUND) / 255.0
FG = torch.tensor(FOREGROUND) / 255.0


@pytest.fixture
def cub_root(tmp_path):
    root = tmp_path / "CUB_Data"
    write_cub_tree(root, {"train": BOUNDARY_RATIOS, "test": BOUNDARY_RATIOS})
    return root


@pytest.fixture
def market_root(tmp_path):
    root = tmp_path / "Market"
    write_market_tree(root, {"train": BOUNDARY_RATIOS, "test": [0.05, 0.5]}, mask_size=(10, 20))
    return root


@pytest.fixture
def atr_root(tmp_path):
    root = tmp_path / "ATR"
    write_atr_tree(root, {"train": BOUNDARY_RATIOS, "test": [0.05, 0.30, 0.60]})
    return root


def ratios(ds):
    return sorted(s.ratio for s in ds.samples)


# ----------------------------------------------------------------------------- names, windows


def test_threshold_parsing_and_mask_names():
    assert parse_threshold(" 0.16 , 0.64") == (0.16, 0.64)
    assert parse_threshold((0.2, 0.3)) == (0.2, 0.3)
    assert parse_threshold(None) is None
    with pytest.raises(ValueError, match="lo,hi"):
        parse_threshold("0.16")
    with pytest.raises(ValueError, match="lo > hi"):
        parse_threshold("0.5,0.1")
    bird = "Black_Footed_Albatross_0035_796140"
    assert split_mask_name(f"{bird}_0.12.png") == (bird, 0.12)
    assert split_mask_name("0467_c3s1_120708_00.jpg_0.34.png") == ("0467_c3s1_120708_00.jpg", 0.34)
    assert split_mask_name("Bird_0001_smooth.png") is None  # the kind of file that broke the original
    assert split_mask_name("Bird_0001.png") is None


# ----------------------------------------------------------------------------- per dataset


def test_cub_filters_train_strictly_and_keeps_test_whole(cub_root):
    train = CUBDataset(cub_root, "train", threshold="0.16,0.64")
    assert ratios(train) == [0.17, 0.40, 0.63]  # 0.16 and 0.64 lie on the (open) window's edges
    assert len(train) == 2 * 3  # CUB train is visited twice per pass
    test = CUBDataset(cub_root, "test", threshold="0.16,0.64")
    assert ratios(test) == BOUNDARY_RATIOS and len(test) == len(BOUNDARY_RATIOS)
    narrow = CUBDataset(cub_root, "train", threshold="0.15,0.17")
    assert ratios(narrow) == [0.16]


def test_cub_item_shape_range_and_doubling(cub_root):
    ds = CUBDataset(cub_root, "train", image_size=128, threshold="0.16,0.64")
    item = ds[0]
    images = item["images"]
    assert images.shape == (4, 128, 128) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert set(images[3].unique().tolist()) == {0.0, 1.0}
    assert item["path"].endswith(".jpg") and item["path"] == str(ds.samples[0].rgb_path)
    # Kept ratios 0.17, 0.63 (items 2 and 4, class 001.Alpha) then 0.40 (item 3, 002.Beta).
    assert [ds[i]["label"] for i in range(3)] == [0, 0, 1]
    assert torch.equal(ds[len(ds) // 2]["images"], images)  # index N is sample 0 again
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_cub_pads_to_square_with_black_and_whitens_background(tmp_path):
    # A 40 x 20 image padded to 40 x 40: 10 black rows above and below, i.e. 32 of 128 output rows;
    # the bicubic kernel (2 source rows = 6.4 output rows) reaches up to row 26 from the image.
    root = tmp_path / "cub"
    write_cub_tree(root, {"test": [0.5]}, size=(40, 20))
    kept = CUBDataset(root, "test", image_size=128, bg=True)[0]["images"]
    assert torch.all(kept[:, :26] == 0) and torch.all(kept[:, -26:] == 0)
    assert torch.all(kept[3, :32] == 0) and torch.all(kept[3, -32:] == 0)  # nearest-resized mask
    assert torch.allclose(kept[:3, 40, 0], BG, atol=1 / 255)  # real background, left edge
    assert torch.allclose(kept[:3, 64, 64], FG, atol=2 / 255)  # object centre
    white = CUBDataset(root, "test", image_size=128, bg=False)[0]["images"]
    background = white[3] == 0
    assert torch.all(white[:3][:, background] == 1.0)
    assert torch.equal(white[:, ~background], kept[:, ~background])


def test_cub_mask_threshold_160_on_soft_masks(tmp_path):
    # Soft border pixels (grey 100) count for the ratio in the name but are background for CUB.
    root = tmp_path / "cub"
    write_cub_tree(root, {"test": [0.5]}, size=(20, 20), soft_border=20)
    ds = CUBDataset(root, "test", image_size=20)
    assert ds.samples[0].ratio == 0.5
    assert ds[0]["images"][3].sum().item() == 200 - 20


def test_market_stretches_and_filters_train_only(market_root):
    train = MarketDataset(market_root, "train", image_size=64, ratio=2, threshold="0.09,0.64")
    assert ratios(train) == [0.10, 0.16, 0.17, 0.40, 0.63]
    assert len(train) == 5  # not doubled
    test = MarketDataset(market_root, "test", image_size=64, ratio=2, threshold="0.09,0.64")
    assert ratios(test) == [0.05, 0.5]
    item = test[1]
    assert item["images"].shape == (4, 128, 64)
    assert item["path"].endswith(".jpg.png") and "/pytorch/query/" in item["path"]
    # The 20x40 image and its 10x20 mask are stretched independently to 64x128: no padding, and
    # the mask block covers half the output like it covers half the input.
    assert item["images"][3].mean().item() == pytest.approx(0.5, abs=0.02)


def test_atr_lists_stretch_and_test_filter_flag(atr_root):
    train = ATRDataset(atr_root, "train", threshold="0.09,0.49")
    assert ratios(train) == [0.10, 0.16, 0.17, 0.40]
    item = train[0]
    assert item["images"].shape == (4, 160, 96) and item["label"] == -1
    assert item["path"].endswith(".jpg") and "/JPEGImages/" in item["path"]
    assert ratios(ATRDataset(atr_root, "test", threshold="0.09,0.49")) == [0.05, 0.30, 0.60]
    filtered = ATRDataset(atr_root, "test", threshold="0.09,0.49", filter_test=True)
    assert ratios(filtered) == [0.30]


def test_atr_reads_original_list_format(atr_root):
    # The original lists name mask files (with their ratio); the ratio suffix is ignored.
    split_list_path(atr_root, "test").write_text("fash_2_0.99.png\nfash_3\n")
    assert ratios(ATRDataset(atr_root, "test")) == [0.30, 0.60]


def test_atr_fit_modes(tmp_path):
    root = tmp_path / "atr"
    write_atr_tree(root, {"test": [0.5]}, size=(40, 20))
    stretched = ATRDataset(root, "test", image_size=40, ratio=1.0, bg=True)[0]["images"]
    padded = ATRDataset(root, "test", image_size=40, ratio=1.0, bg=True, fit_mode="pad")[0]["images"]
    assert torch.all(padded[:, :10] == 0)  # 10 black rows on top of the 40 x 20 image
    assert torch.allclose(stretched[:3, 0, 0], BG, atol=1 / 255)  # no padding when stretched


@pytest.mark.parametrize(
    ("name", "size", "ratio", "shape"),
    [("cub", 128, 1.0, (4, 128, 128)), ("market", 64, 2.0, (4, 128, 64)), ("atr", 96, 1.666666, (4, 160, 96))],
)
def test_build_dataset_sizes(name, size, ratio, shape, cub_root, market_root, atr_root):
    root = {"cub": cub_root, "market": market_root, "atr": atr_root}[name]
    ds = build_dataset(name, root, "train", size, ratio, "0.09,0.64", aug=True, bg=False)
    for i in range(3):
        images = ds[i]["images"]
        assert images.shape == shape and images.dtype == torch.float32
        assert 0.0 <= images.min() and images.max() <= 1.0
        assert set(images[3].unique().tolist()) <= {0.0, 1.0} and images[3].sum() > 0
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["images"].shape == (2, *shape) and len(batch["path"]) == 2


def test_build_dataset_rejects_bad_names_and_flags(cub_root):
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("pascal3d", cub_root, "train", 128, 1.0, None, False, False)
    with pytest.raises(ValueError, match="original_crop"):
        build_dataset("market", cub_root, "train", 64, 2.0, None, False, False, original_crop=True)
    with pytest.raises(ValueError, match="split"):
        build_dataset("cub", cub_root, "val", 128, 1.0, None, False, False)


# ----------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("name", ["cub", "market", "atr"])
def test_augmentation_is_deterministic_under_a_seed(name, cub_root, market_root, atr_root):
    root = {"cub": cub_root, "market": market_root, "atr": atr_root}[name]
    ds = build_dataset(name, root, "train", 32, 1.0, None, aug=True, bg=True)

    def draw(seed):
        torch.manual_seed(seed)
        return torch.stack([ds[i]["images"] for i in range(4)])

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    plain = build_dataset(name, root, "train", 32, 1.0, None, aug=False, bg=True)
    torch.manual_seed(0)
    first = plain[2]["images"]
    torch.manual_seed(1)
    assert torch.equal(first, plain[2]["images"])


def test_crop_box_fixed_size_and_original_edges():
    # Padded 128-px image: W' = 148, so w in [int(.95*148), int(.99*148)] = [140, 146].
    torch.manual_seed(0)
    widths = set()
    for _ in range(200):
        left, upper, right, lower = crop_box(148, 148, original=False)
        assert 140 <= right - left <= 146 and 140 <= lower - upper <= 146
        assert 0 <= left and right <= 148 and 0 <= upper and lower <= 148
        widths.add(right - left)
    assert len(widths) > 3
    original_widths = []
    for _ in range(200):
        left, upper, right, lower = crop_box(148, 148, original=True)
        assert 0 <= left < right <= 148 and 0 <= upper < lower <= 148
        original_widths.append(right - left)
    assert min(original_widths) < 140  # the original's independent edge draws shrink some crops


def test_market_shift_is_a_translation_of_the_plain_item(market_root):
    ds = MarketDataset(market_root, "test", image_size=32, ratio=2)
    plain = ds[1]["images"][3]
    padded = torch.nn.functional.pad(plain, (10, 10, 10, 10))
    ds.aug = True
    for seed in range(5):
        torch.manual_seed(seed)
        shifted = ds[1]["images"][3]
        candidates = [padded[u:u + 64, v:v + 32] for u in range(21) for v in range(21)]
        assert any(torch.equal(shifted, c) or torch.equal(shifted, c.flip(1)) for c in candidates)


# ----------------------------------------------------------------------------- bad input


def test_missing_root_and_split_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_cub.py"):
        CUBDataset(tmp_path / "nowhere", "train")
    (tmp_path / "cub" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="test split"):
        CUBDataset(tmp_path / "cub", "test")
    with pytest.raises(FileNotFoundError, match="prepare_market.py"):
        MarketDataset(tmp_path / "cub", "train")
    with pytest.raises(FileNotFoundError, match="prepare_ATR.py"):
        ATRDataset(tmp_path / "cub", "train")


def test_empty_split_and_empty_window(tmp_path, cub_root):
    (tmp_path / "cub" / "train" / "001.Alpha").mkdir(parents=True)
    with pytest.raises(ValueError, match="no '<stem>_<ratio>.png' mask"):
        CUBDataset(tmp_path / "cub", "train")
    with pytest.raises(ValueError, match="widen the threshold"):
        CUBDataset(cub_root, "train", threshold="0.8,0.9")


def test_unprepared_masks_are_reported_not_loaded(tmp_path, caplog):
    # An un-prepared CUB tree: masks without the ratio suffix.
    root = tmp_path / "cub"
    write_cub_tree(root, {"train": [0.3, 0.4]})
    mask = next((root / "train" / "001.Alpha").glob("*_0.30.png"))
    mask.rename(mask.with_name(mask.name.replace("_0.30", "")))
    with caplog.at_level(logging.WARNING):
        ds = CUBDataset(root, "train")
    assert ratios(ds) == [0.4]
    assert len(ds.skipped["image without a mask"]) == 1
    assert len(ds.skipped["PNG without a '_<ratio>.png' suffix (not a mask; run the prepare script)"]) == 1
    assert "skipped 1 file(s): image without a mask" in caplog.text


def test_missing_partners_unreadable_and_mismatched_files_are_counted_skips(tmp_path, caplog):
    root = tmp_path / "cub"
    write_cub_tree(root, {"train": [0.2, 0.3, 0.4, 0.5, 0.6]})
    alpha, beta = root / "train" / "001.Alpha", root / "train" / "002.Beta"
    (alpha / "Bird_train_0000.jpg").unlink()  # mask without image (ratio 0.2)
    next(beta.glob("*_0.30.png")).unlink()  # image without mask
    (alpha / "Bird_train_0002.jpg").write_bytes(b"not an image")  # unreadable (ratio 0.4)
    Image.fromarray(np.zeros((7, 7), np.uint8)).save(next(beta.glob("*_0.50.png")))  # size mismatch
    with caplog.at_level(logging.WARNING):
        ds = CUBDataset(root, "train")
    assert ratios(ds) == [0.6]
    assert {reason: len(paths) for reason, paths in ds.skipped.items()} == {
        "mask without its image": 1,
        "image without a mask": 1,
        "unreadable image (UnidentifiedImageError)": 1,
        "image and mask sizes differ": 1,
    }
    assert caplog.text.count("skipped 1 file(s)") == 4


def test_truncated_file_and_empty_mask_are_skipped_at_load_time(tmp_path, caplog):
    root = tmp_path / "cub"
    write_cub_tree(root, {"test": [0.2, 0.3, 0.4]}, size=(60, 40))
    ds = CUBDataset(root, "test", image_size=32)
    truncated = ds.samples[0].rgb_path
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) * 3 // 4])  # header intact, data cut
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(ds.samples[1].mask_path)  # all-zero mask
    ds = CUBDataset(root, "test", image_size=32)
    assert len(ds) == 3  # the header checks at construction cannot see either problem
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(3)]
    assert [item["path"] for item in items] == [str(ds.samples[2].rgb_path)] * 3
    assert ds.load_skips == 3  # item 0 skips two bad samples, item 1 skips one
    assert "cannot decode" in caplog.text and "no foreground pixel" in caplog.text


def test_every_sample_bad_raises_instead_of_looping(tmp_path):
    root = tmp_path / "cub"
    write_cub_tree(root, {"test": [0.2]})
    ds = CUBDataset(root, "test")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(ds.samples[0].mask_path)
    with pytest.raises(RuntimeError, match="every sample failed"):
        ds[0]


def test_atr_missing_list_and_missing_masks(atr_root):
    split_list_path(atr_root, "test").unlink()
    with pytest.raises(FileNotFoundError, match="prepare_ATR.py"):
        ATRDataset(atr_root, "test")
    split_list_path(atr_root, "test").write_text("fash_1\nfash_99\n")
    ds = ATRDataset(atr_root, "test")
    assert ratios(ds) == [0.05]
    assert len(ds.skipped["listed image without a mask in Seg/"]) == 1
    split_list_path(atr_root, "test").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        ATRDataset(atr_root, "test")


# ----------------------------------------------------------------------------- ATR split lists


def test_atr_split_counts_per_prefix():
    stems = [f"{prefix}_{n}" for prefix, (tr, te) in SPLIT_COUNTS.items() for n in range(1, tr + te + 1)]
    train, test = split_stems(stems)
    assert (len(train), len(test)) == (16000, 1706)
    assert not set(train) & set(test)
    for prefix, (n_train, n_test) in SPLIT_COUNTS.items():
        assert sum(s.rsplit("_", 1)[0] == prefix for s in test) == n_test
        assert sum(s.rsplit("_", 1)[0] == prefix for s in train) == n_train
    assert split_stems(reversed(stems)) == (train, test)  # order of discovery does not matter


def test_atr_split_positions_by_hand():
    # 'fash' with 10 stems is not the full prefix: k = round(10 * 50 / 685) = 1 at floor(0.5 * 10) = 5.
    # Numeric order, not string order: fash_10 comes after fash_9.
    train, test = split_stems([f"fash_{n}" for n in range(1, 11)])
    assert test == ["fash_6"]
    assert train[-2:] == ["fash_9", "fash_10"]
    # An unknown prefix gets the overall fraction: round(100 * 1706 / 17706) = 10 stems, at
    # floor((i + 0.5) * 10) = 5, 15, ..., 95.
    train, test = split_stems([f"new_{n}" for n in range(100)])
    assert test == [f"new_{n}" for n in range(5, 100, 10)]


def test_block_mask_fixture_has_the_named_ratio():
    mask = block_mask(40, 30, 0.17)
    assert (mask > 0).sum() == round(0.17 * 1200)
    assert np.asarray(object_image(mask))[mask > 0].tolist()[0] == list(FOREGROUND)
