"""The CUDA-only fast paths (GPU only): they must learn what the plain eager step learns.

--cuda_graphs: tiny runs of the README's step (the three-mode encoder alternation, --hard, --bg,
WGAN-GP) long enough that every mode is warmed up, captured and replayed; what a run changes between
steps (learning rate, warm-up factor, template) must reach the replayed graphs, and their checkpoints
resume either way. --concurrent_encoders: the sub-encoders on their own CUDA streams compute what they
compute one after the other, eagerly and inside the graphs.
"""

import shutil
from functools import partial

import pytest
import torch

import utils.trainer as trainer_module
from networks.attribute_encoder import FROZEN_BY_MODE
from utils.model import build_template
from utils.options import parse_options
from utils.template_update import bad_samples
from utils.trainer import Trainer
from utils.trainer import train as run_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# 72 images at batch 4: 18 steps an epoch, 6 of each encoder mode (3 eager warm-up steps, the capture, replays).
FLAGS = ["--dataset", "synthetic", "--imageSize", "64", "--batchSize", "4", "--synthetic_train", "72",
         "--synthetic_test", "4", "--workers", "0", "--device", "cuda", "--eval_every", "100", "--vis_every", "100",
         "--hard", "--bg", "--unmask", "2", "--update_shape", "-1", "--L1", "--ganw", "0", "--lambda_depthC", "0.1",
         "--em", "7", "--em_gap", "1", "--update_bn", "--scheduler", "restart1", "--warm_epoch", "1",
         "--swa_start", "10", "--no-cudnn_benchmark"]  # (SWA would start at --niter // 2, ending the EM updates)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def options(tmp_path, data_root, name, *extra):
    return parse_options([*FLAGS, "--dataroot", data_root, "--log_root", str(tmp_path), "--name", name, *extra], {})


def _steps(tmp_path, data_root, flags, count):
    """A trainer after `count` steps with `flags` (a flag or a list), and the steps' statistics."""
    flags = [flags] if isinstance(flags, str) else flags
    trainer = Trainer(options(tmp_path, data_root, "_".join(f.strip("-") for f in flags), *flags))
    trainer.train_sampler.set_epoch(0, 0)
    batches = [b["images"] for b in trainer.train_loader]
    stats = []
    for i in range(count):
        trainer._advance_warm_up()
        stats.append({k: float(v) for k, v in trainer._step(batches[i], i).items()})
    return trainer, stats


def _deviation(a, b):
    """Largest relative difference between two runs' per-step values of the steadier loss terms."""
    return max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b, strict=True)
               for k in ("D/total", "E/total", "E/data", "mask_iou"))


def test_graphed_steps_track_the_eager_steps(tmp_path, data_root):
    eager, eager_stats = _steps(tmp_path, data_root, "--no-cuda_graphs", 18)
    eager_rng = torch.cuda.get_rng_state()
    _, again_stats = _steps(tmp_path, data_root, "--no-cuda_graphs", 18)
    graphed, graphed_stats = _steps(tmp_path, data_root, "--cuda_graphs", 18)
    assert eager._graphs is None and sorted(graphed._graphs.graphs) == [3, 4, 5]  # captured at steps 9-11
    # Replays draw the eager step's random numbers: the generator ends where the eager run's did.
    assert torch.equal(torch.cuda.get_rng_state(), eager_rng)
    # The first step's losses come before any update: the same kernels on the same numbers, up to the
    # rounding of cuDNN's algorithm choice (on the H200, E/gan = -5.1788e-09 against -5.1809e-09).
    for k, value in eager_stats[0].items():
        assert graphed_stats[0][k] == pytest.approx(value, rel=1e-4, abs=1e-10), k
    # After it, eager GPU training is not bitwise repeatable (grid_sample's backward adds with atomics)
    # and fused Adam reads a float32 learning rate in the graphs: the graphed run must stay as close to
    # an eager run as a second eager run does. A graph reading a stale batch, warm-up factor or learning
    # rate would be off by far more.
    assert _deviation(eager_stats, graphed_stats) <= 3 * _deviation(eager_stats, again_stats) + 1e-3
    assert [s["warm_up"] for s in graphed_stats] == [s["warm_up"] for s in eager_stats]


def test_graphs_read_the_current_learning_rate_warm_up_and_template(tmp_path, data_root):
    trainer, _ = _steps(tmp_path, data_root, "--cuda_graphs", 12)
    graphs = dict(trainer._graphs.graphs)
    batches = [b["images"] for b in trainer.train_loader]
    params = [p for m in (trainer.encoder, trainer.critic) for p in m.parameters()]

    for opt in (trainer.opt_e, trainer.opt_d):  # as a scheduler sets it
        for group in opt.param_groups:
            group["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    assert trainer._step(batches[0], 12)
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))

    trainer.warm_up = 0.0
    stats = trainer._step(batches[1], 13)
    assert float(stats["D/total"]) == 0.0 and float(stats["E/total"]) == 0.0

    template = trainer.template.verts * 1.1  # as the EM update sets it
    trainer._set_template(template)
    trainer._step(batches[2], 14)
    attrs = trainer._last_batch[3]
    torch.testing.assert_close(attrs.verts - attrs.delta_verts, template.expand_as(attrs.verts), rtol=0, atol=1e-5)
    assert trainer._graphs.graphs == graphs  # replayed, not captured again


def test_a_graphed_runs_checkpoint_resumes_with_and_without_graphs(tmp_path, data_root, monkeypatch):
    # After 18-36 steps the evaluation-mode offsets of these tiny runs can all be near saturation, which the
    # template update drops as failed predictions (on the H200 every one was, and no update was applied);
    # keep them all here, so that the update the resumed runs must carry out is applied.
    monkeypatch.setattr(trainer_module, "bad_samples", partial(bad_samples, limit=1.0))
    run_training(options(tmp_path, data_root, "graphed", "--niter", "1", "--cuda_graphs"))
    shutil.copytree(tmp_path / "graphed", tmp_path / "plain")
    resumed = run_training(options(tmp_path, data_root, "graphed", "--niter", "2", "--cuda_graphs", "--resume"))
    plain = run_training(options(tmp_path, data_root, "plain", "--niter", "2", "--no-cuda_graphs", "--resume"))
    for trainer in (resumed, plain):
        assert trainer.global_step == 36
        group = trainer.opt_e.param_groups[0]  # the checkpoint holds the eager step's optimizer groups
        assert isinstance(group["lr"], float) and not group["capturable"]
        assert all(p.isfinite().all() for p in trainer.encoder.parameters())
    assert not torch.equal(plain.template.verts.cpu(), build_template(plain.opts).verts)  # the EM update ran


def test_a_graphed_trainer_is_freed_with_its_last_reference(tmp_path, data_root, freed_at_once):
    # The step's graphs must not hold the trainer in a reference cycle (see tests/test_training.py).
    trainer, _ = _steps(tmp_path, data_root, "--cuda_graphs", 12)
    assert sorted(trainer._graphs.graphs) == [3, 4, 5]
    assert trainer.channels_last  # the default on a CUDA device
    box = [trainer]
    del trainer
    assert freed_at_once(box)


def _encode(encoder, images, mode):
    """Attributes and parameter gradients of one forward and backward, the dropout masks drawn from seed 0."""
    torch.manual_seed(0)
    encoder.zero_grad(set_to_none=True)
    attrs = encoder(images, mode)
    outputs = [attrs.azimuth_deg, attrs.elevation_deg, attrs.distance, attrs.offset, attrs.delta_verts,
               attrs.texture, attrs.light, attrs.background]
    sum(o.square().mean() for o in outputs if o.requires_grad).backward()
    grads = [p.grad for p in encoder.parameters()]
    return [o.detach().clone() for o in outputs], [None if g is None else g.clone() for g in grads]


def _record_stream(seen, name, module, args):
    """Forward pre-hook: note the stream `name` runs on (returning None leaves the call's arguments alone)."""
    seen.setdefault(name, torch.cuda.current_stream())


@pytest.mark.parametrize("mode", [0, 4])
def test_concurrent_sub_encoders_compute_what_sequential_ones_do_on_their_own_streams(tmp_path, data_root, mode,
                                                                                     monkeypatch):
    # The backward pass is not bitwise repeatable (atomic additions), and cuDNN's default TF32 convolutions
    # amplify that: on the H200, two sequential passes of mode 0 gave gradients 1.8e-2 apart (relative
    # norm of one parameter's difference) with TF32 and 9.6e-6 without; sequential against concurrent
    # 1.4e-2 and 4.8e-6. Compared in float32, a stream race would be off by far more than 1e-4.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    trainer, _ = _steps(tmp_path, data_root, ["--no-cuda_graphs", "--no-concurrent_encoders"], 1)
    encoder = trainer.encoder
    images = trainer._last_batch[0].clone()
    assert not encoder.concurrent
    sequential = _encode(encoder, images, mode)
    encoder.concurrent = True
    seen = {}
    for name in ("camera", "shape", "texture", "light", "background"):
        module = getattr(encoder, f"{name}_encoder")
        module.register_forward_pre_hook(partial(_record_stream, seen, name))
    concurrent = _encode(encoder, images, mode)
    assert seen["camera"] == torch.cuda.current_stream()  # the first keeps the current stream,
    assert len({seen[k] for k in seen}) == 5  # each other one runs on its own
    for a, b in zip(sequential[0], concurrent[0], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    trained = 0
    for a, b in zip(sequential[1], concurrent[1], strict=True):
        assert (a is None) == (b is None)  # the frozen sub-encoders get no gradient either way
        if a is not None:
            assert (b - a).norm() <= 1e-4 * a.norm()
            trained += 1
    assert 0 < trained < len(sequential[1]) if FROZEN_BY_MODE[mode] else trained == len(sequential[1])


def test_graphed_concurrent_steps_track_the_sequential_eager_steps(tmp_path, data_root):
    eager, eager_stats = _steps(tmp_path, data_root, ["--no-cuda_graphs", "--no-concurrent_encoders"], 18)
    _, again_stats = _steps(tmp_path, data_root, ["--no-cuda_graphs", "--no-concurrent_encoders"], 18)
    graphed, graphed_stats = _steps(tmp_path, data_root, ["--cuda_graphs", "--concurrent_encoders"], 18)
    assert not eager.encoder.concurrent and graphed.encoder.concurrent
    assert sorted(graphed._graphs.graphs) == [3, 4, 5]
    for k, value in eager_stats[0].items():  # before any update: the same numbers up to cuDNN's rounding
        assert graphed_stats[0][k] == pytest.approx(value, rel=1e-4, abs=1e-10), k
    assert _deviation(eager_stats, graphed_stats) <= 3 * _deviation(eager_stats, again_stats) + 1e-3
