"""Run folders of the original code (its released models): detection, conversion, the three scripts.

The original's ``netE`` keys and shapes come from the fact table ``tests/data/original_netE.txt``
(read from the original module tree); a run folder in the original's format is built from it with
random tensors, the original's ``opts.yaml`` keys and a ``best_mesh.obj`` as the original writes it.
"""

import importlib.util
import io
import math
from pathlib import Path

import pytest
import torch
import yaml

from datasets.fixtures import write_market_tree
from renderer.mesh import icosphere, normalize_template
from utils.model import load_run
from utils.released import (
    RELEASED_RUNS,
    convert_state_dict,
    dataset_from_name,
    original_key,
    original_options,
    read_original_checkpoint,
)

timm = pytest.importorskip("timm", reason="the original's shape backbone is timm's HRNet (pip install -e .[test])")

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "data" / "original_netE.txt"
SPEC_TOTAL_PARAMETERS = 56_214_509  # model-training.md §4.11, AttributeEncoder with bg


# ----------------------------------------------------------------------------- the fact table


def _bn(prefix, c):
    return {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


def _conv_block(prefix, cin, cout, k, norm):
    keys = {f"{prefix}.conv.weight": (cout, cin, k, k)}
    if norm == "none":
        keys[f"{prefix}.conv.bias"] = (cout,)
    else:
        keys |= _bn(f"{prefix}.norm", cout)
    return keys


def _attention(prefix, c):
    return {f"{prefix}.1.weight": (c // 16, c, 1, 1), f"{prefix}.1.bias": (c // 16,),
            f"{prefix}.3.weight": (c, c // 16, 1, 1), f"{prefix}.3.bias": (c,)}


def _resnet_layer(prefix, n, cin, cout, stride):
    keys = {}
    for i in range(n):
        block_in = cin if i == 0 else cout
        keys |= {f"{prefix}.{i}.conv1.weight": (cout, block_in, 3, 3), f"{prefix}.{i}.conv2.weight": (cout, cout, 3, 3)}
        keys |= _bn(f"{prefix}.{i}.bn1", cout) | _bn(f"{prefix}.{i}.bn2", cout)
    if stride != 1 or cin != cout:
        keys |= {f"{prefix}.0.downsample.0.weight": (cout, cin, 1, 1)} | _bn(f"{prefix}.0.downsample.1", cout)
    return keys


def _timm(prefix, name, in_channels, params):
    net = timm.create_model(name, pretrained=False, num_classes=0)
    keys = {f"{prefix}.{k}": tuple(v.shape) for k, v in net.state_dict().items()}
    stem = keys[f"{prefix}.conv1.weight"]
    keys[f"{prefix}.conv1.weight"] = (stem[0], in_channels, *stem[2:])
    counted = sum(math.prod(s) for k, s in keys.items() if not k.endswith(("running_mean", "running_var", "tracked")))
    assert counted == params, f"timm's {name} has {counted} parameters, the original's {params}"
    return keys


def expand_table(path=TABLE) -> dict[str, tuple[int, ...]]:
    """Original key -> shape, from the module-level fact table."""
    keys = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        kind, prefix, *args = line.split()
        num = [int(a) for a in args if a.isdigit()]
        if kind == "conv2d_block":
            keys |= _conv_block(prefix, *num[:3], args[3])
        elif kind == "resblock_half":
            c, norm = num[0], args[1]
            keys |= _conv_block(f"{prefix}.model.0", c, c, 3, norm) | _conv_block(f"{prefix}.model.1", c, c, 3, norm)
        elif kind == "resblocks":
            n, c, norm = num[0], num[1], args[2]
            for i in range(n):
                keys |= _conv_block(f"{prefix}.model.{i}.model.0", c, c // 2, 3, norm)
                keys |= _conv_block(f"{prefix}.model.{i}.model.1", c // 2, c, 3, norm)
            keys |= _attention(f"{prefix}.ca", c)
        elif kind == "channel_attention":
            keys |= _attention(prefix, num[0])
        elif kind == "aspp":
            c = num[0]
            for i, width in enumerate((c // 4, c // 4, c // 4, c - 3 * (c // 4)), start=1):
                keys |= {f"{prefix}.conv{i}.weight": (width, c, 3, 3), f"{prefix}.conv{i}.bias": (width,)}
            keys |= _attention(f"{prefix}.ca", c)
        elif kind == "mmpool":
            keys[f"{prefix}.p"] = (1,)
        elif kind in ("linear", "conv1d"):
            cin, cout = num
            keys |= {f"{prefix}.weight": (cout, cin) + ((1,) if kind == "conv1d" else ()), f"{prefix}.bias": (cout,)}
        elif kind == "batchnorm":
            keys |= _bn(prefix, num[0])
        elif kind == "conv2d":
            cin, cout, k = num
            keys[f"{prefix}.weight"] = (cout, cin, k, k)
        elif kind == "resnet_layer":
            keys |= _resnet_layer(prefix, *num)
        elif kind == "timm":
            keys |= _timm(prefix, args[0], *num)
        else:
            raise ValueError(f"unknown kind {kind!r} in {path}")
    return keys


@pytest.fixture(scope="module")
def original_keys():
    return expand_table()


def test_fact_table_matches_the_specified_parameter_count(original_keys):
    parameters = sum(math.prod(s) for k, s in original_keys.items()
                     if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert parameters == SPEC_TOTAL_PARAMETERS


# ----------------------------------------------------------------------------- an original run folder

CUB_OPTS = dict(  # the original's opts.yaml of the README's CUB run: its keys, dead ones included
    name=RELEASED_RUNS["cub"].name, configs_yml="configs/image.yml", dataroot="./data/CUB_Data", ratio=1,
    gan_type="wgan", template_path="./template/sphere.obj", ellipsoid=1.0, category="bird", pretrains="hr18sv2",
    pretrainc="none", pretraint="res34", norm="bn", workers=8, prefetch_factor=4, batchSize=48, imageSize=128,
    nk=5, nf=32, niter=600, lr=7e-05, scheduler="restart1", clip=0.05, azim=1.0, beta1=0.95, wd=0.0, inv=0.0,
    droprate="0.2,0.2,0", cuda=1, manualSeed=0, start_epoch=0, warm_epoch=40, fp16=False, multigpus=False,
    resume=False, chamfer=True, amsgrad=True, bg=True, nolpl=False, white=True, smooth=0.5, makeup=0, beta=0.0,
    hard=True, cross=False, adamw=False, L1=True, flipL1=False, coordconv=True, unmask=2, romp=False, swa=True,
    em=7.0, em_gap=2, swa_start=500, swa_interval=1, update_shape=-1, update_bn=True, swa_lr=0.0003,
    lambda_gan=0.0001, ganw=0.0, lambda_edge=0.001, lambda_depth=0.0, lambda_depthR=0.0, lambda_depthC=0.1,
    lambda_deform=0.1, lambda_flipz=0.1, lambda_data=2.0, lambda_ic=1.0, lambda_reg=0.1, lambda_lpl=0.1,
    lambda_flat=0.01, gamma=0.1, temp=2.0, dis1=0.0, dis2=0.0, lambda_contour=0.1, lambda_lc=0.0,
    image_weight=1.0, gan_reg=10.0, em_step=0.1, hmr=0.0, threshold="0.16,0.64", clean_threshold="0.25,0.49",
    bias_range=0.3, azi_scope=360.0, elev_range="0~30", hard_range=0, dist_range="2~7", outf="./log/" + "CUB",
)
MARKET_OPTS = CUB_OPTS | dict(
    name=RELEASED_RUNS["market"].name, dataroot="../Market/hq/seg_hmr", ratio=2, ellipsoid=2.0, imageSize=64,
    lr=5e-05, scheduler="cosine", update_bn=False, gamma=0.01, lambda_depthR=0.15, lambda_depthC=0.0,
    lambda_flat=0.02, lambda_contour=0.0, threshold="0.09,0.64", clean_threshold="0.36,0.49", bias_range=0.5,
    elev_range="-15~15", dist_range="2~6", topK=0.01, eps=0.2,
)


def random_tensor(key, shape, generator):
    if key.endswith("num_batches_tracked"):
        return torch.tensor(1000)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=generator)
    if key.endswith(("running_mean", ".bias", ".p")) or len(shape) == 1:
        return 0.1 * torch.randn(shape, generator=generator)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def write_original_mesh(path, verts, faces, face_uvs):
    """best_mesh.obj as the original's save_mesh writes it: v lines, one vt per face corner, f without UVs."""
    lines = [f"v {x:f} {y:f} {z:f}" for x, y, z in verts.tolist()]
    lines += [f"vt {u:f} {v:f}" for u, v in face_uvs.reshape(-1, 2).tolist()]
    lines += [f"f {a} {b} {c}" for a, b, c in (faces + 1).tolist()]
    path.write_text("\n".join(lines) + "\n")


def write_original_run(log_root, opts, keys, seed=0, swa=True, drop=(), extra=None, reshape=None,
                       with_opts=True):
    """log_root/<name>/ in the original's format; returns (run folder, netE state dict, template verts)."""
    generator = torch.Generator().manual_seed(seed)
    net_e = {k: random_tensor(k, s, generator) for k, s in keys.items() if k not in drop}
    net_e |= extra or {}
    for key, shape in (reshape or {}).items():
        net_e[key] = torch.zeros(shape)
    run_dir = log_root / opts["name"]
    (run_dir / "ckpts").mkdir(parents=True)
    checkpoint = {"epoch": 480, "netE": net_e, "netD": {"conv.weight": torch.zeros(2)}}
    if swa:
        checkpoint["swa_modelE"] = {f"module.{k}": v + 1 for k, v in net_e.items()} | {"n_averaged": torch.tensor(80)}
    torch.save(checkpoint, run_dir / "ckpts" / "best_ckpt.pth")
    verts, faces, face_uvs = icosphere()
    verts = normalize_template(verts, opts["ellipsoid"]) * (1 + 0.1 * torch.rand(verts.shape, generator=generator))
    write_original_mesh(run_dir / "ckpts" / "best_mesh.obj", verts, faces, face_uvs)
    if with_opts:
        (run_dir / "opts.yaml").write_text(yaml.safe_dump(opts))
    return run_dir, net_e, verts


def snapshot(root):
    """Relative path -> (size, modification time) of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("config", ["cub", "market"])
def test_original_run_converts_with_every_tensor_used(tmp_path, original_keys, config, capsys):
    opts = CUB_OPTS if config == "cub" else MARKET_OPTS
    run_dir, net_e, verts = write_original_run(tmp_path, opts, original_keys, swa=config == "cub")
    before = snapshot(run_dir)
    run = load_run(run_dir)
    assert "converted the original's run folder" in capsys.readouterr().out
    assert snapshot(run_dir / "converted") and {k: v for k, v in snapshot(run_dir).items()
                                                if not k.startswith("converted/")} == before
    assert run.opts.dataset == config and run.opts.bg and run.opts.pretrains == "hr18sv2" and run.epoch == 480
    assert (run.opts.imageSize, run.opts.ratio) == ((128, 1.0) if config == "cub" else (64, 2.0))
    assert run.opts.dataroot == ("data/CUB_Data" if config == "cub" else "data/Market")

    ours = run.encoder.state_dict()
    assert len(ours) == len(net_e) - 6 + 1  # the last BiFPN's up4 (conv + 5 BN tensors) dropped, template added
    # best_mesh.obj holds 6 decimals (the original's "%f")
    assert torch.allclose(ours["template"], verts, atol=1e-6, rtol=0) and torch.equal(run.template.verts,
                                                                                      ours["template"])
    pairs = {  # one tensor of each sub-encoder, by the original's name
        "camera_encoder.azimuth_head.3.weight": "camera_enc.linear2.3.weight",
        "camera_encoder.backbone.layer4.1.blocks.2.body.1.norm.running_var":
            "camera_enc.encoder1.layer4.1.model.2.model.1.norm.running_var",
        "shape_encoder.backbone.net.conv1.weight": "shape_enc.encoder1.model.conv1.weight",
        "shape_encoder.point_mlp.4.weight": "shape_enc.encoder2.4.weight",
        "texture_encoder.backbone.layer3.0.downsample.0.weight": "texture_enc.block4.0.downsample.0.weight",
        "texture_encoder.decoder.fuse.1.down3.norm.weight": "texture_enc.bifpn.bifpn2.down2.0.norm.weight",
        "texture_encoder.decoder.up_full.1.branches.3.bias": "texture_enc.bifpn.up5a.1.conv4.bias",
        "light_encoder.head.3.bias": "light_enc.linear3.bias",
        "background_encoder.net.1.attention.gate.3.weight": "bg_enc.encoder.1.ca.3.weight",
    }
    for key, original in pairs.items():
        assert torch.equal(ours[key], net_e[original]), key

    if config == "cub":
        swa = load_run(run_dir, swa=True).encoder.state_dict()
        assert torch.equal(swa["light_encoder.head.3.bias"], net_e["light_enc.linear3.bias"] + 1)
        assert "converted the original's" not in capsys.readouterr().out  # converted once
    with torch.no_grad():
        attrs = run.encoder(torch.rand(2, 4, *((128, 128) if config == "cub" else (128, 64))), 0)
    assert torch.isfinite(attrs.verts).all() and attrs.texture.shape[-2:] == ((256, 128) if config == "cub"
                                                                                else (256, 64))


def test_original_key_names_without_shape_dropout():
    # --drop c,0,t: the original's point-wise MLP has no Dropout module, its later layers move down one.
    assert original_key("shape_encoder.point_mlp.4.weight", drop_shape=0.0) == "shape_enc.encoder2.3.weight"
    assert original_key("shape_encoder.point_mlp.4.weight", drop_shape=0.2) == "shape_enc.encoder2.4.weight"
    assert original_key("shape_encoder.point_mlp.1.bias", drop_shape=0.0) == "shape_enc.encoder2.1.bias"


@pytest.mark.parametrize("change, message", [
    (dict(drop=("camera_enc.linear2.1.running_var",)), r"missing \(1\): camera_enc\.linear2\.1\.running_var"),
    (dict(extra={"camera_enc.linear4.weight": torch.zeros(2)}), r"not used by this model \(1\): camera_enc\.linear4"),
    (dict(reshape={"light_enc.linear3.weight": (9, 64)}),
     r"wrong shape \(1\): light_enc\.linear3\.weight \(9, 64\) \(expected \(9, 48\)"),
])
def test_missing_extra_or_misshapen_tensor_is_named(tmp_path, original_keys, change, message):
    run_dir, _, _ = write_original_run(tmp_path, MARKET_OPTS, original_keys, swa=False, **change)
    with pytest.raises(ValueError, match=message):
        load_run(run_dir)
    assert not (run_dir / "converted" / "ckpts" / "best.pt").exists()


def test_convert_state_dict_lists_every_problem():
    expected = {"light_encoder.head.3.bias": torch.zeros(9), "light_encoder.head.3.weight": torch.zeros(9, 48)}
    with pytest.raises(ValueError, match=r"missing \(1\): light_enc\.linear3\.weight; not used by this model \(1\): "
                                         r"x; wrong shape \(1\): light_enc\.linear3\.bias \(8,\)"):
        convert_state_dict({"light_enc.linear3.bias": torch.zeros(8), "x": torch.zeros(1)}, expected,
                           torch.zeros(3, 3), 0.2, "ckpt")


class Payload:
    """An object whose unpickling would run code (here: create a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_an_arbitrary_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "best_ckpt.pth"
    torch.save({"epoch": 1, "netE": {"w": torch.zeros(1)}, "extra": Payload(marker)}, path)
    with pytest.raises(ValueError, match="holds more than tensors and plain containers.*It was not loaded"):
        read_original_checkpoint(path)
    assert not marker.exists()
    buffer = io.BytesIO()
    torch.save({"epoch": 1}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="not a checkpoint of the original code"):
        read_original_checkpoint(path)


def test_released_run_without_opts_yaml_uses_its_readme_command(tmp_path):
    run_dir = tmp_path / RELEASED_RUNS["market"].name
    run_dir.mkdir()
    opts = original_options(run_dir, tmp_path / "template.obj")
    assert (opts.dataset, opts.imageSize, opts.ratio, opts.droprate, opts.bg) == ("market", 64, 2.0, "0.2,0.2,0", True)
    (run_dir / "opts.yaml").write_text(yaml.safe_dump(MARKET_OPTS | dict(imageSize=96, pretraint="res18")))
    opts = original_options(run_dir, tmp_path / "template.obj")
    assert opts.imageSize == 96 and opts.pretraint == "res34"  # the original built ResNet-34 for any res*
    (run_dir / "opts.yaml").write_text(yaml.safe_dump(MARKET_OPTS | dict(norm="ibn")))
    with pytest.raises(ValueError, match="--norm ibn is not provided here"):
        original_options(run_dir, tmp_path / "template.obj")
    other = tmp_path / "ATR2_mine"
    other.mkdir()
    with pytest.raises(FileNotFoundError, match="opts.yaml is missing: the original's test.py needs it too"):
        original_options(other, tmp_path / "template.obj")


def test_dataset_from_the_run_name_as_the_original_test_py():
    assert dataset_from_name(RELEASED_RUNS["market"].name) == ("market", False)
    assert dataset_from_name(RELEASED_RUNS["cub"].name) == ("cub", False)
    assert dataset_from_name("ATR2_wgan_b48") == ("atr", True) and dataset_from_name("ATR_x") == ("atr", False)


# ----------------------------------------------------------------------------- the three scripts


def test_scripts_run_on_an_original_run_folder(tmp_path, original_keys, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the converted options point at our dataset folder, data/Market
    write_market_tree(tmp_path / "data" / "Market", {"train": [0.3], "test": [0.3, 0.4]})
    run_dir, _, _ = write_original_run(tmp_path / "log", MARKET_OPTS, original_keys, swa=False)
    run_args = ["--name", MARKET_OPTS["name"], "--device", "cpu"]

    assert script("test").main(run_args) == 0
    out = capsys.readouterr().out
    assert "converted the original's run folder" in out and "2 test images, market" in out
    assert "mask IoU (soft)" in out and (run_dir / "metrics.jsonl").is_file()

    assert script("show_rainbow2").main(run_args + ["--num_images", "1"]) == 0
    assert "converted" not in capsys.readouterr().out.split("test images")[0]
    assert (run_dir / "current_rainbow.gif").is_file() and (run_dir / "meshes" / "template.obj").is_file()

    image = next((tmp_path / "data" / "Market" / "pytorch").rglob("*.png"))
    mask = next((tmp_path / "data" / "Market" / "seg_hmr").rglob(f"{image.name[:-len('.png')]}_*.png"))
    assert script("demo").main(run_args + [str(image), "--mask", str(mask)]) == 0
    assert (run_dir / "demo" / f"{image.stem}_rotation.gif").is_file()
