"""`--download` of the prepare scripts and `download_models.py`, with the network call replaced.

Each fixture archive is built here in the layout of the original README's archive; the fake gdown
checks that the README's Google Drive id was asked for and writes the archive (or a broken one).
"""

import importlib.util
import shutil
import zipfile
from pathlib import Path

import pytest

from datasets.atr import ATRDataset
from datasets.cub import CUBDataset
from datasets.fixtures import write_atr_raw, write_cub_tree, write_market_tree
from datasets.market import MarketDataset
from utils.cli import EXIT_EXPECTED, EXIT_INTERRUPTED, run_main

ROOT = Path(__file__).resolve().parents[1]
CUB_DATA_ID = "1SkX_FWUfLOaTr371TBkQnDH9oDJ5Khwc"


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name, argv, capsys):
    code = run_main(script(name).main, [str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def zip_tree(source: Path, archive: Path, prefix: str = "") -> Path:
    """Zip every file under ``source`` as ``<prefix>/<relative path>``."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            zf.write(path, str(Path(prefix) / path.relative_to(source)))
    return archive


def fake_drive(monkeypatch, files: dict[str, Path]):
    """Replace gdown.download: Drive id -> archive to deliver; returns the list of ids asked for."""
    asked = []

    def download(id, output, quiet):  # noqa: A002 - gdown's keyword names
        asked.append(id)
        shutil.copyfile(files[id], output)
        return output

    monkeypatch.setattr("gdown.download", download)
    return asked


@pytest.fixture
def cub_data_zip(tmp_path):
    """The processed CUB_Data archive: CUB_Data/{train,test}/<class>/<name>.jpg + <name>_<r>.png."""
    source = tmp_path / "source"
    write_cub_tree(source / "CUB_Data", {"train": [0.3, 0.4], "test": [0.35]})
    return zip_tree(source, tmp_path / "CUB_Data-released.zip")


def cub_args(data):
    return ["--download", "--archives", data, "--root", data / "CUB_Data", "--raw", data / "CUB_200_2011"]


def test_cub_download_unpacks_the_processed_archive(tmp_path, cub_data_zip, capsys, monkeypatch):
    data = tmp_path / "data"
    asked = fake_drive(monkeypatch, {CUB_DATA_ID: cub_data_zip})
    code, out = run("prepare_cub", cub_args(data), capsys)
    assert code == 0, out
    assert asked == [CUB_DATA_ID]
    assert "processed tree in" in out and "train: 2 pairs" in out
    code, out = run("prepare_cub", ["--check", "--root", data / "CUB_Data"], capsys)
    assert code == 0 and "no problems found" in out
    assert len(CUBDataset(data / "CUB_Data", "test", image_size=64, ratio=1.0, threshold=None, aug=False,
                          bg=False)) == 1
    code, out = run("prepare_cub", cub_args(data), capsys)  # a second run downloads and unpacks nothing
    assert code == 0 and asked == [CUB_DATA_ID] and "unpacked" not in out


def test_truncated_archive_is_rejected_and_the_next_run_fetches_it_again(tmp_path, cub_data_zip, capsys,
                                                                          monkeypatch):
    data = tmp_path / "data"
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(cub_data_zip.read_bytes()[: cub_data_zip.stat().st_size // 2])
    asked = fake_drive(monkeypatch, {CUB_DATA_ID: truncated})
    code, out = run("prepare_cub", cub_args(data), capsys)
    assert code == EXIT_EXPECTED and "CUB_Data.zip is not a complete zip or tar archive" in out
    assert "renamed CUB_Data.zip.rejected" in out and "--download again" in out
    assert not (data / "CUB_Data").exists() and not (data / "CUB_Data.zip").exists()

    fake_drive(monkeypatch, {CUB_DATA_ID: cub_data_zip})
    code, out = run("prepare_cub", cub_args(data), capsys)
    assert code == 0 and "train: 2 pairs" in out and len(asked) == 1


def test_archive_with_the_wrong_layout_is_rejected(tmp_path, capsys, monkeypatch):
    data, source = tmp_path / "data", tmp_path / "source"
    write_atr_raw(source / "humanparsing", ["2500_1"])  # an ATR archive where CUB_Data was expected
    fake_drive(monkeypatch, {CUB_DATA_ID: zip_tree(source, tmp_path / "wrong.zip")})
    code, out = run("prepare_cub", cub_args(data), capsys)
    assert code == EXIT_EXPECTED
    assert "does not have the layout of CUB_Data.zip (expected train and test inside, missing train)" in out
    assert (data / "CUB_Data.zip.rejected").is_file() and not (data / "CUB_Data").exists()


def test_interrupted_unpack_leaves_nothing_that_looks_complete(tmp_path, cub_data_zip, capsys, monkeypatch):
    data = tmp_path / "data"
    fake_drive(monkeypatch, {CUB_DATA_ID: cub_data_zip})
    real_extract = zipfile.ZipFile._extract_member

    def extract_then_stop(self, member, targetpath, pwd):
        if str(getattr(member, "filename", member)).endswith(".png"):  # some images are out, then Ctrl-C
            raise KeyboardInterrupt
        return real_extract(self, member, targetpath, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "_extract_member", extract_then_stop)
    code, out = run("prepare_cub", cub_args(data), capsys)
    assert code == EXIT_INTERRUPTED and "prepare_cub.py: interrupted" in out
    unpacked = data / "CUB_Data.zip.d"
    assert (unpacked / ".CUB_Data.zip.partial").is_dir()  # the half-extracted files are only in the staging folder
    assert not (data / "CUB_Data").exists() and not (unpacked / ".CUB_Data.zip.unpacked").exists()
    code, out = run("prepare_cub", ["--check", "--root", data / "CUB_Data"], capsys)
    assert code == 1 and "PROBLEM missing folder" in out

    monkeypatch.setattr(zipfile.ZipFile, "_extract_member", real_extract)
    code, out = run("prepare_cub", cub_args(data), capsys)
    assert code == 0 and "unpacked" in out and "train: 2 pairs" in out
    assert not (unpacked / ".CUB_Data.zip.partial").exists()


def test_market_download_uses_the_readme_ids(tmp_path, capsys, monkeypatch):
    source, root = tmp_path / "source", tmp_path / "Market"
    write_market_tree(source / "hq", {"train": [0.2, 0.3], "test": [0.4]})
    images = zip_tree(source / "hq" / "pytorch", tmp_path / "images.zip", "hq/pytorch")
    masks = zip_tree(source / "hq" / "seg_hmr", tmp_path / "masks.zip", "hq/seg_hmr")
    asked = fake_drive(monkeypatch, {"10gNi3n8Iny4O4MOZRs5dNFICfj8ri9eW": images,
                                     "1JwQTQA4F9WOqLAc7fhQN0DTYwnv6XrAR": masks})
    code, out = run("prepare_market", ["--root", root, "--download"], capsys)
    assert code == 0, out
    assert asked == ["10gNi3n8Iny4O4MOZRs5dNFICfj8ri9eW", "1JwQTQA4F9WOqLAc7fhQN0DTYwnv6XrAR"]
    code, out = run("prepare_market", ["--check", "--root", root], capsys)
    assert code == 0 and "no problems found" in out
    assert len(MarketDataset(root, "test", image_size=64, ratio=2.0, threshold=None, aug=False, bg=False)) == 1


def test_market_masks_archive_in_place_of_the_images_is_rejected(tmp_path, capsys, monkeypatch):
    source = tmp_path / "source"
    write_market_tree(source / "hq", {"test": [0.4]})
    masks = zip_tree(source / "hq" / "seg_hmr", tmp_path / "masks.zip", "hq/seg_hmr")
    fake_drive(monkeypatch, {"10gNi3n8Iny4O4MOZRs5dNFICfj8ri9eW": masks})
    code, out = run("prepare_market", ["--root", tmp_path / "Market", "--download"], capsys)
    assert code == EXIT_EXPECTED and "expected pytorch/query inside, missing pytorch/query" in out


def test_atr_download_unpacks_prepares_and_checks(tmp_path, capsys, monkeypatch):
    source, root = tmp_path / "source", tmp_path / "ATR"
    write_atr_raw(source / "humanparsing", [f"2500_{n}" for n in range(1, 11)])
    fake_drive(monkeypatch, {"1kpsMDrbM4FQqtP7Y1nKslp4OlRKNvbaL": zip_tree(source, tmp_path / "atr.zip")})
    code, out = run("prepare_ATR", ["--root", root, "--download"], capsys)
    assert code == 0, out
    assert "10 masks written" in out
    code, out = run("prepare_ATR", ["--check", "--root", root], capsys)
    assert code == 0 and "no problems found" in out
    assert len(ATRDataset(root, "train", image_size=96, ratio=1.666666, threshold=None, aug=False, bg=False)) > 0


# ----------------------------------------------------------------------------- trained models

MARKET_RUN = "CamN2_MKT_wgan_b48_lr0.5_em7_update-1_lpl_reg0.1_data2_m2_flat20_depthR0.15_drop220_gap2_beta0.95_clean67"
MARKET_MODEL_ID = "1-eqnnFt3D7-jUelJ5uj_4QcFv-TMok8c"


@pytest.fixture
def market_model_zip(tmp_path):
    """The released archive's layout: <run>/ckpts/{best_ckpt.pth, best_mesh.obj} (content is not read here)."""
    ckpts = tmp_path / "source" / MARKET_RUN / "ckpts"
    ckpts.mkdir(parents=True)
    (ckpts / "best_ckpt.pth").write_bytes(b"checkpoint")
    (ckpts / "best_mesh.obj").write_text("v 0 0 0\n")
    return zip_tree(tmp_path / "source", tmp_path / "model.zip")


def test_download_models_puts_the_run_where_the_original_readme_does(tmp_path, market_model_zip, capsys,
                                                                     monkeypatch):
    asked = fake_drive(monkeypatch, {MARKET_MODEL_ID: market_model_zip})
    log = tmp_path / "log"
    code, out = run("download_models", ["market", "--log_root", log], capsys)
    assert code == 0, out
    assert asked == [MARKET_MODEL_ID] and f"python test.py --name {MARKET_RUN}" in out
    assert (log / MARKET_RUN / "ckpts" / "best_ckpt.pth").read_bytes() == b"checkpoint"
    code, out = run("download_models", ["market", "--log_root", log], capsys)
    assert code == 0 and "already in place" in out and len(asked) == 1


def test_download_models_rejects_a_truncated_archive_and_resumes(tmp_path, market_model_zip, capsys, monkeypatch):
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(market_model_zip.read_bytes()[:-30])
    fake_drive(monkeypatch, {MARKET_MODEL_ID: truncated})
    log = tmp_path / "log"
    code, out = run("download_models", ["market", "--log_root", log], capsys)
    assert code == EXIT_EXPECTED and "is not a complete zip or tar archive" in out and not (log / MARKET_RUN).exists()
    fake_drive(monkeypatch, {MARKET_MODEL_ID: market_model_zip})
    code, out = run("download_models", ["market", "--log_root", log], capsys)
    assert code == 0 and (log / MARKET_RUN / "ckpts" / "best_mesh.obj").is_file()


def test_download_models_wrong_layout_and_offline(tmp_path, capsys, monkeypatch):
    source = tmp_path / "source" / "ckpts"
    source.mkdir(parents=True)
    (source / "best_ckpt.pth").write_bytes(b"checkpoint")  # no best_mesh.obj
    fake_drive(monkeypatch, {MARKET_MODEL_ID: zip_tree(tmp_path / "source", tmp_path / "model.zip")})
    code, out = run("download_models", ["market", "--log_root", tmp_path / "log"], capsys)
    assert code == EXIT_EXPECTED and "missing ckpts/best_mesh.obj" in out

    def offline(**kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("gdown.download", offline)
    code, out = run("download_models", ["cub", "--log_root", tmp_path / "log"], capsys)
    assert code == EXIT_EXPECTED and "downloading CUB_wgan_b48" in out and "failed (ConnectionError: no network)" in out
    assert "ckpts/best_ckpt.pth exists" in out and "save it as" in out
