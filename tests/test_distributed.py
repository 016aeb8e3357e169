"""Two processes (torchrun, gloo on the CPU) train the same model: identical weights and templates on
both ranks, one checkpoint written by rank 0, and --resume continuing with both ranks."""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Each rank trains, then saves what it ended with, for the test to compare.
RANK_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    from utils.options import parse_options
    from utils.trainer import train
    trainer = train(parse_options(sys.argv[1:], {{}}))
    # Parameters only: BatchNorm running statistics are per process unless --sync_bn (DDP broadcasts
    # rank 0's at the start of every forward; rank 0's are the ones checkpointed).
    state = {{"encoder": dict(trainer.encoder.named_parameters()), "critic": dict(trainer.critic.named_parameters()),
              "template": trainer.template.verts, "step": trainer.global_step}}
    torch.save(state, os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
""")


def torchrun(script: Path, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def load_ranks(out: Path):
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_ranks_agree(states):
    a, b = states
    assert a["step"] == b["step"]
    assert torch.equal(a["template"], b["template"])
    for part in ("encoder", "critic"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs between ranks"


def test_two_gloo_ranks_stay_identical_and_resume(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(root=str(ROOT), out=str(out)))
    # 8 images, 2 per rank and step: two steps per epoch; the template is updated from both ranks.
    args = ["--dataset", "synthetic", "--imageSize", "64", "--batchSize", "2", "--synthetic_train", "8",
            "--synthetic_test", "4", "--workers", "0", "--device", "cpu", "--dataroot", str(tmp_path / "data"),
            "--log_root", str(tmp_path / "log"), "--name", "ddp", "--eval_every", "100", "--vis_every", "100",
            "--em", "7", "--em_gap", "1", "--update_shape", "-1", "--swa_start", "10"]
    torchrun(script, [*args, "--niter", "1"])
    first = load_ranks(out)
    assert first[0]["step"] == 2
    assert_ranks_agree(first)
    initial = first[0]["template"]

    run = tmp_path / "log" / "ddp"
    ckpt = torch.load(run / "ckpts" / "latest.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and len(ckpt["rng"]) == 2  # one RNG state per rank
    assert len(list(run.glob("*.yaml"))) == 1 and (run / "log.txt").is_file()

    torchrun(script, [*args, "--niter", "2", "--resume"])
    second = load_ranks(out)
    assert second[0]["step"] == 4
    assert_ranks_agree(second)
    assert not torch.equal(second[0]["template"], initial)  # the epoch-1 update moved it on both ranks
