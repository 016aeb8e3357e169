"""--cuda_graphs: the training step captured as CUDA graphs learns what the eager step learns (GPU only).

A tiny run of the README's step (the three-mode encoder alternation, --hard, --bg, WGAN-GP) long enough
that every mode is warmed up, captured and replayed, across an epoch end with a template update, a
BatchNorm re-estimation and a learning-rate change.
"""

import pytest
import torch

from utils.model import build_template
from utils.options import parse_options
from utils.trainer import Trainer
from utils.trainer import train as run_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

# 48 images at batch 4: 12 steps an epoch, 4 of each encoder mode (3 eager warm-up steps, then the capture).
FLAGS = ["--dataset", "synthetic", "--imageSize", "64", "--batchSize", "4", "--synthetic_train", "48",
         "--synthetic_test", "4", "--workers", "0", "--device", "cuda", "--eval_every", "100", "--vis_every", "100",
         "--hard", "--bg", "--unmask", "2", "--update_shape", "-1", "--L1", "--ganw", "0", "--lambda_depthC", "0.1",
         "--em", "7", "--em_gap", "1", "--update_bn", "--scheduler", "restart1", "--warm_epoch", "1",
         "--no-cudnn_benchmark"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def options(tmp_path, data_root, name, *extra):
    return parse_options([*FLAGS, "--dataroot", data_root, "--log_root", str(tmp_path), "--name", name, *extra], {})


def _steps(tmp_path, data_root, flag, count):
    trainer = Trainer(options(tmp_path, data_root, flag.strip("-"), flag))
    trainer.train_sampler.set_epoch(0, 0)
    batches = [b["images"] for b in trainer.train_loader]
    stats = []
    for i in range(count):
        trainer._advance_warm_up()
        stats.append({k: float(v) for k, v in trainer._step(batches[i], i).items()})
    return trainer, stats


def _params(trainer):
    state = {f"encoder.{k}": v for k, v in trainer.encoder.state_dict().items()}
    state.update({f"critic.{k}": v for k, v in trainer.critic.state_dict().items()})
    state["template"] = trainer.template.verts
    return state


def _assert_close_params(a, b, atol):
    a, b = _params(a), _params(b)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def test_graphed_steps_give_the_eager_losses(tmp_path, data_root):
    eager, eager_stats = _steps(tmp_path, data_root, "--no-cuda_graphs", 12)
    graphed, graphed_stats = _steps(tmp_path, data_root, "--cuda_graphs", 12)
    assert eager._graphs is None and sorted(graphed._graphs.graphs) == [3, 4, 5]  # every mode was captured
    # The same kernels on the same random numbers; fused Adam reads the learning rate as a float32 tensor
    # instead of a double (a rounding of the step size), so equal up to float32 rounding, not bitwise.
    for i, (e, g) in enumerate(zip(eager_stats, graphed_stats, strict=True)):
        assert e.keys() == g.keys()
        for k in e:
            assert g[k] == pytest.approx(e[k], rel=1e-3, abs=1e-7), (i, k)
    _assert_close_params(eager, graphed, atol=1e-4)


def test_a_graphed_run_across_epoch_ends_matches_the_eager_run(tmp_path, data_root):
    # Two epochs: the template update, BatchNorm re-estimation and scheduler step between them change
    # what the graphs captured in epoch 0 read; they must see it in epoch 1.
    eager = run_training(options(tmp_path, data_root, "eager", "--niter", "2", "--no-cuda_graphs"))
    graphed = run_training(options(tmp_path, data_root, "graphed", "--niter", "2", "--cuda_graphs"))
    assert not torch.equal(graphed.template.verts.cpu(), build_template(graphed.opts).verts)  # the EM update ran
    _assert_close_params(eager, graphed, atol=1e-4)


def test_a_graphed_run_resumes_exactly_and_its_checkpoint_loads_in_the_eager_step(tmp_path, data_root):
    straight = run_training(options(tmp_path, data_root, "straight", "--niter", "2", "--cuda_graphs"))
    run_training(options(tmp_path, data_root, "resumed", "--niter", "1", "--cuda_graphs"))
    resumed = run_training(options(tmp_path, data_root, "resumed", "--niter", "2", "--cuda_graphs", "--resume"))
    assert resumed.global_step == straight.global_step == 24
    _assert_close_params(straight, resumed, atol=0)  # resumed graphs replay the same kernels
    run_training(options(tmp_path, data_root, "plain", "--niter", "1", "--cuda_graphs"))
    plain = run_training(options(tmp_path, data_root, "plain", "--niter", "2", "--no-cuda_graphs", "--resume"))
    assert plain.opt_e.param_groups[0]["lr"] == straight.opt_e.param_groups[0]["lr"]
    assert isinstance(plain.opt_e.param_groups[0]["lr"], float) and not plain.opt_e.param_groups[0]["capturable"]
    _assert_close_params(straight, plain, atol=1e-4)
