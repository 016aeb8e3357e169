"""Options schema, checkpoints, data order and the template-update arithmetic."""

import argparse
import importlib.util
import signal
from pathlib import Path

import pytest
import torch
import yaml

from utils.checkpoints import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from utils.data import EpochSampler, SeededItems, ignore_stop_signals
from utils.model import build_encoder, build_template
from utils.options import build_parser, check_same_options, derive, load_options, parse_options, save_options
from utils.template_update import bad_samples, step_template

# ----------------------------------------------------------------------------- options


def test_readme_abbreviations_resolve_to_full_flags():
    opts = parse_options(["--batch", "48", "--drop", "0.2,0.2,0", "--clean", "0.36,0.49", "--em", "7"], {})
    assert opts.batchSize == 48
    assert opts.droprate == "0.2,0.2,0"
    assert opts.clean_threshold == "0.36,0.49"
    assert opts.em == 7.0 and opts.em_gap == 1  # exact name wins over the --em_gap prefix


@pytest.mark.parametrize("flag", ["bg", "swa", "chamfer", "amsgrad", "white", "coordconv", "hard", "L1"])
def test_every_boolean_switches_both_ways(flag):
    on = parse_options([f"--{flag}"], {})
    off = parse_options([f"--no-{flag}"], {})
    assert getattr(on, flag) is True and getattr(off, flag) is False


def test_original_crop_is_the_default_of_cropped_datasets_and_switches_both_ways():
    for dataset, default in [("cub", True), ("atr", True), ("synthetic", True), ("birds", True), ("market", False)]:
        assert derive(parse_options(["--dataset", dataset], {})).original_crop is default, dataset
        assert derive(parse_options(["--dataset", dataset, "--no-original_crop"], {})).original_crop is False
    assert derive(parse_options(["--original_crop"], {})).original_crop is True
    with pytest.raises(ValueError, match="shift"):
        parse_options(["--dataset", "market", "--original_crop"], {})


def test_texture_scratch_blocks_reach_the_model_and_bad_values_are_refused():
    opts = parse_options(["--dataset", "synthetic", "--texture_scratch_blocks", "2,1,1,1"], {})
    encoder = build_encoder(opts, build_template(opts))
    assert [len(level[1].blocks) for level in encoder.texture_encoder.backbone.levels] == [2, 1, 1, 1]
    for bad in ("1,3,3", "1,0,1,1", "a,b,c,d"):
        with pytest.raises(ValueError, match="texture_scratch_blocks"):
            parse_options(["--texture_scratch_blocks", bad], {})
    with pytest.raises(ValueError, match="train_repeats"):
        parse_options(["--train_repeats", "0"], {})


def test_a_run_saved_before_texture_scratch_blocks_existed_is_rebuilt_with_the_shallow_trunk(tmp_path):
    opts = parse_options(["--dataset", "synthetic"], {})
    stored = vars(opts).copy()
    del stored["texture_scratch_blocks"]
    path = tmp_path / "opts.yaml"
    path.write_text(yaml.safe_dump(stored))
    assert load_options(path).texture_scratch_blocks == "1,1,1,1"
    with pytest.raises(ValueError, match="--texture_scratch_blocks '1,1,1,1'"):
        check_same_options(opts, path)
    check_same_options(parse_options(["--dataset", "synthetic", "--texture_scratch_blocks", "1,1,1,1"], {}), path)
    # A run with the ResNet-34 texture encoder never built that trunk: it continues with today's value.
    res34 = parse_options(["--dataset", "synthetic", "--pretraint", "res34", "--no-pretrained"], {})
    stored = vars(res34).copy()
    del stored["texture_scratch_blocks"]
    path.write_text(yaml.safe_dump(stored))
    assert load_options(path).texture_scratch_blocks == res34.texture_scratch_blocks
    check_same_options(res34, path)


def test_script_defaults_and_synthetic_preset_yield_to_the_command_line():
    market = {"name": "baseline-MKT", "ratio": 2.0, "imageSize": 64}
    opts = parse_options([], market)
    assert (opts.name, opts.ratio, opts.imageSize) == ("baseline-MKT", 2.0, 64)
    synth = parse_options(["--dataset", "synthetic", "--imageSize", "96"], market)
    assert synth.imageSize == 96 and synth.pretraint == "none" and synth.niter == 6


def test_birds_preset_yields_to_the_command_line():
    opts = parse_options(["--dataset", "birds"], {"dataroot": "./data/CUB_Data", "imageSize": 128})
    assert (opts.dataroot, opts.imageSize, opts.pretrains, opts.niter, opts.synthetic_train) == (
        "./data/birds", 128, "none", 200, 2048)
    small = parse_options(["--dataset", "birds", "--imageSize", "64", "--birds_spp", "4"], {})
    assert small.imageSize == 64 and small.birds_spp == 4 and small.pretraint == "none"


def test_unknown_script_default_is_rejected():
    with pytest.raises(ValueError, match="unknown option"):
        build_parser({"not_a_flag": 1})


def test_derived_values_are_computed_once_and_checked():
    opts = parse_options(["--imageSize", "96", "--ratio", "1.666666", "--niter", "500"], {})
    d = derive(opts)
    assert (d.height, d.width) == (160, 96)
    assert d.swa_start == 400 and d.elev_range == (0.0, 30.0) and d.threshold == (0.16, 0.64)
    assert derive(parse_options(["--niter", "20"], {})).swa_start == 10
    with pytest.raises(ValueError, match="droprate"):
        derive(argparse.Namespace(**{**vars(opts), "droprate": "0.2,0.2"}))
    with pytest.raises(ValueError, match="dist_range"):
        parse_options(["--dist_range", "0.5~3"], {})
    with pytest.raises(ValueError, match="lr_shape_backbone"):
        parse_options(["--lr_shape_backbone", "-0.1"], {})


def test_options_yaml_round_trip(tmp_path):
    opts = parse_options(["--name", "x", "--lr", "7e-5", "--bg"], {})
    save_options(opts, tmp_path / "opts.yaml")
    assert vars(load_options(tmp_path / "opts.yaml")) == vars(opts)
    with pytest.raises(FileNotFoundError, match="run name"):
        load_options(tmp_path / "missing" / "opts.yaml")


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_is_atomic_and_round_trips(tmp_path, monkeypatch):
    path = tmp_path / "ckpts" / "latest.pt"
    save_checkpoint({"w": torch.arange(3.0)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3.0))

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3.0))  # old file intact
    assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]  # no temp file left
    with pytest.raises(FileNotFoundError, match="train the run first"):
        load_checkpoint(tmp_path / "nope.pt")


def test_rng_state_round_trip():
    seed_everything(3)
    state = rng_state()
    a = torch.rand(4)
    set_rng_state(state)
    assert torch.equal(torch.rand(4), a)


# ----------------------------------------------------------------------------- data order


def _batches(sampler, bs):
    pairs = list(sampler)
    return [pairs[i:i + bs] for i in range(0, len(pairs), bs)]


def test_sampler_is_seeded_per_epoch_and_resumes_mid_epoch():
    s = EpochSampler(10, batch_size=3, seed=1)
    s.set_epoch(0)
    full = _batches(s, 3)
    assert len(full) == 3 and len({i for b in full for _, i in b}) == 9  # drop_last, no repeats
    s.set_epoch(0, start_batch=2)
    assert _batches(s, 3) == full[2:]
    s.set_epoch(1)
    assert [i for _, i in list(s)] != [i for b in full for _, i in b]


def test_sampler_shards_global_batches_over_ranks():
    single = EpochSampler(12, batch_size=4, seed=0)
    ranks = [EpochSampler(12, batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)]
    for s in (single, *ranks):
        s.set_epoch(5)
    full = [i for _, i in single]
    r0, r1 = ([i for _, i in s] for s in ranks)
    assert r0[:2] + r1[:2] + r0[2:4] + r1[2:4] + r0[4:] + r1[4:] == full
    with pytest.raises(ValueError, match="cannot fill one batch"):
        EpochSampler(3, batch_size=2, seed=0, world_size=2)


def test_seeded_items_are_worker_independent_and_leave_the_caller_rng_alone():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.rand(2)

    items = SeededItems(Noisy(), seed=7)
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    first = items[(3, 2)]
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(items[(3, 2)], first)
    assert not torch.equal(items[(4, 2)], first)


# ----------------------------------------------------------------------------- template update


def test_bad_samples_look_at_every_vertex():
    delta = torch.zeros(3, 5, 3)
    delta[1, 2] = 0.45  # one wild vertex in the middle
    delta[2, :, 0] = 0.3  # large but below the limit everywhere
    assert bad_samples(delta).tolist() == [False, True, False]


def _path_laplacian(n):
    lap = torch.zeros(n, n)
    for i in range(n):
        nb = [j for j in (i - 1, i + 1) if 0 <= j < n]
        lap[i, i] = -1
        lap[i, nb] = 1 / len(nb)
    return lap


def test_template_step_matches_hand_computation():
    template = torch.tensor([[0.0, 0, 1], [1, 0, -1], [2, 0, 1]])
    offsets = torch.tensor([[0.0, 0, 0], [0.3, 0, 0], [0.0, 0, 0]])  # already a sum over 2 samples
    lap = _path_laplacian(3)
    out = step_template(template, offsets, 2, lap, em=1, step=0.1, warm_up=1.0, smooth=0.5,
                        clip=0.05, white=False, reject_crossing=False)
    # mean = (0, .15, 0) in x; one smoothing pass: x += 0.5 * (L x) = (.075, .075, .075); clip .05
    assert torch.allclose(out.verts[:, 0], template[:, 0] + 0.1 * 0.05)
    assert out.accepted and out.used == 2 and out.crossings == 0
    # em 7: three passes; white re-centres
    out7 = step_template(template, offsets, 2, lap, em=7, step=0.1, warm_up=1.0, smooth=0.5,
                         clip=1.0, white=True, reject_crossing=False)
    delta = offsets / 2
    for _ in range(3):
        delta = delta + 0.5 * lap @ delta
    expected = template + 0.1 * delta
    assert torch.allclose(out7.verts, expected - expected.mean(0))


def test_template_step_rejects_crossings_and_tiny_counts():
    template = torch.tensor([[0.0, 0, 0.001], [1, 0, -1], [2, 0, 1]])
    push = torch.tensor([[0.0, 0, -1.0], [0, 0, 0], [0, 0, 0]])
    lap = _path_laplacian(3)
    kw = dict(em=1, step=1.0, warm_up=1.0, smooth=0.0, clip=0.05, white=False)
    crossed = step_template(template, push * 2, 2, lap, reject_crossing=False, **kw)
    assert crossed.crossings == 1 and crossed.accepted
    kept = step_template(template, push * 2, 2, lap, reject_crossing=True, **kw)
    assert not kept.accepted and torch.equal(kept.verts, template)
    assert not step_template(template, push, 1, lap, reject_crossing=False, **kw).accepted


def test_loader_workers_leave_stop_signals_to_the_main_process():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in before)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _bench_learning_curve():
    """bench/learning_curve.py, which is a script folder, not a package."""
    path = Path(__file__).resolve().parents[1] / "bench" / "learning_curve.py"
    spec = importlib.util.spec_from_file_location("bench_learning_curve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learning_curve_bench_variants_defaults_and_table():
    bench = _bench_learning_curve()
    assert bench.parse_variant("before=--lr_shape_backbone 1 --no-bg") == ("before", ["--lr_shape_backbone", "1",
                                                                                     "--no-bg"])
    assert bench.parse_variant("after=") == ("after", [])
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=FLAGS"):
        bench.parse_variant("no-equals-sign")
    assert bench.script_defaults("train_market")["dataset"] == "market"
    lines = [{"run": f"{v}_s{s}", "step": step, "mask_iou": iou, "ssim": 0.5}
             for v, s, step, iou in [("a", 0, 10, 0.2), ("a", 1, 10, 0.4), ("a", 0, 20, 0.6), ("b", 0, 10, 0.1)]]
    rows = bench.table(lines, [10, 20]).splitlines()
    assert rows[2] == "| **a** (mean of 2) | 0.300 / 0.500 | 0.600 / 0.500 |"  # step 20: only seed 0 got there
    assert rows[4] == "| a_s1 | 0.400 / 0.500 | - |"
    assert rows[5] == "| **b** (mean of 1) | 0.100 / 0.500 | - |"


# ----------------------------------------------------------------------------- the step's device-side pieces


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_a_skipped_optimizer_step_changes_nothing_and_an_unskipped_one_is_a_plain_step(cls):
    from utils.trainer import _load_optimizer, _step_unless

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = cls(params, lr=0.1, betas=(0.5, 0.999), amsgrad=True, weight_decay=0.01, fused=True)
    reference = cls(plain, lr=0.1, betas=(0.5, 0.999), amsgrad=True, weight_decay=0.01)
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, plain, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        reference.step()
        assert _step_unless(fused, torch.tensor(False))
        before = [p.detach().clone() for p in params]
        state = {k: v.clone() for k, v in fused.state[params[0]].items()}
        for p in params:
            p.grad = torch.full_like(p, float("nan"))
        assert not _step_unless(fused, torch.tensor(True))
        params[0].grad = torch.zeros_like(params[0])  # a finite loss with one non-finite gradient: skipped too
        assert not _step_unless(fused, torch.tensor(False))
        assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
        assert all(torch.equal(state[k], v) for k, v in fused.state[params[0]].items())
        assert float(fused.state[params[0]]["step"]) == step + 1
        for p, q in zip(params, plain, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    # A state written by an unfused optimizer (an older checkpoint) loads into the fused one and on.
    _load_optimizer(fused, reference.state_dict())
    assert fused.param_groups[0]["fused"] and fused.state[params[0]]["step"].device == params[0].device
    _step_unless(fused, torch.tensor(False))


def test_permutation_keeps_the_random_stream_and_avoids_failed_samples():
    from types import SimpleNamespace

    from utils.trainer import Trainer

    fake = SimpleNamespace(device=torch.device("cpu"))
    torch.manual_seed(3)
    expected = torch.randperm(8)
    torch.manual_seed(3)
    assert torch.equal(Trainer._permutation(fake, 8, torch.zeros(8, dtype=torch.bool)), expected)
    bad = torch.tensor([True, False, True, True, False, True, True, True])
    for seed in range(20):
        torch.manual_seed(seed)
        perm = Trainer._permutation(fake, 8, bad)
        assert not bad[perm].any()
        torch.manual_seed(seed)
        kept = torch.randperm(8)
        assert torch.equal(perm[~bad[kept]], kept[~bad[kept]])  # entries at good samples stay
    everything_bad = torch.ones(8, dtype=torch.bool)
    assert sorted(Trainer._permutation(fake, 8, everything_bad).tolist()) == list(range(8))
