"""The one training loop (model-training.md §6), shared by the three training scripts.

Per step: encode the batch (with the encoder-alternation schedule), re-render it, build a set of
interpolated attributes under a random camera and render it, re-encode that render (attribute
cycle), update the critic (WGAN-GP), then the encoders on the weighted sum of all loss terms. Per
epoch: SWA, schedulers, evaluation, images, the template (EM) update and a checkpoint.

Reliability: every checkpoint holds the models, optimizers, schedulers, SWA state, learned template,
warm-up, data position and RNG states, so `--resume` continues bit-for-bit on the CPU; checkpoints
keep two generations and survive kills and full disks (utils/checkpoints.py); `ckpts/latest.pt` is
written at every epoch end and every `--save_every_min` minutes inside an epoch; `--auto_resume`
starts or resumes, whichever the run folder calls for (a requeued job's command); SIGINT/SIGTERM
finish the current step, save and exit; a non-finite loss or gradient skips the step and several in a row stop
the run without writing a bad checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import build_dataset
from datasets.birds import ensure_birds
from datasets.synthetic import ensure_synthetic
from networks import Attributes, losses, mode_for_iteration
from renderer.mesh import save_obj
from utils.checkpoints import (
    load_newest,
    previous_generation,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from utils.cli import RunError
from utils.data import EpochSampler, SeededItems, ignore_stop_signals
from utils.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from utils.metrics import evaluate
from utils.model import (
    as_image,
    build_critic,
    build_encoder,
    build_template,
    evaluation_split,
    render_attributes,
    resolve_device,
)
from utils.options import check_same_options, derive, save_options
from utils.template_update import bad_samples, step_template
from utils.visualization import save_epoch_visuals

log = logging.getLogger("magic_mirror")
LOG_EVERY = 10  # steps between reads of the loss statistics (progress bar, TensorBoard)


class NonFiniteLossError(RunError):
    """Training diverged: too many non-finite losses in a row, or non-finite weights at a save."""


class Trainer:
    """Owns the models, optimizers and state of one run; `fit()` trains it to the end."""

    def __init__(self, opts: argparse.Namespace, dist_info: DistInfo | None = None):
        self.opts, self.d = opts, derive(opts)
        self.dist = dist_info or DistInfo()
        self.device = resolve_device(opts.device)
        torch.backends.cudnn.benchmark = opts.cudnn_benchmark  # process-wide, as in the original
        torch.set_float32_matmul_precision("high" if opts.tf32 else "highest")  # process-wide too
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.run_dir = self.d.run_dir
        self.latest_path = self.run_dir / "ckpts" / "latest.pt"
        resuming = self._prepare_run_dir()
        seed_everything(opts.manualSeed + self.dist.rank)

        self.template = build_template(opts).to(self.device)
        self.initial_verts = self.template.verts.clone()
        self.encoder = build_encoder(opts, self.template).to(self.device)
        self.critic = build_critic(opts).to(self.device)
        # The memory layout cuDNN's fast kernels use; on the CPU the default keeps PyTorch's own.
        self.channels_last = opts.channels_last if opts.channels_last is not None else self.device.type == "cuda"
        if self.channels_last:  # the weights follow; checkpoints hold the same values either way
            self.encoder.to(memory_format=torch.channels_last)
            self.critic.to(memory_format=torch.channels_last)
        self.train_encoder, self.train_critic = self.encoder, self.critic
        if opts.concurrent_encoders and self.dist.enabled:
            log.info("--concurrent_encoders: off under torchrun (DistributedDataParallel reduces the gradients "
                     "as one stream's backward produces them)")
        self.encoder.concurrent = opts.concurrent_encoders and not self.dist.enabled
        if self.dist.enabled:
            if opts.sync_bn:
                if self.device.type != "cuda":
                    raise ValueError("--sync_bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel)")
                self.encoder = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_encoder = DistributedDataParallel(self.encoder, device_ids=ids, find_unused_parameters=True)
            self.train_critic = DistributedDataParallel(self.critic, device_ids=ids)
        self.opt_e, self.opt_d = self._optimizers()
        self.sched_e, self.sched_d = self._scheduler(self.opt_e), self._scheduler(self.opt_d)
        self.swa = AveragedModel(self.encoder) if opts.swa else None
        self._gan_losses = ((losses.wgan_critic_loss, losses.wgan_generator_loss) if opts.gan_type == "wgan"
                            else (losses.lsgan_critic_loss, losses.lsgan_generator_loss))

        self._build_data()
        self.warm_iterations = max(1, self.train_sampler.num_batches * opts.warm_epoch)
        self.warm_up = 0.01 if opts.warm_epoch > 0 else 1.0
        # The loss factor the step reads: a device tensor filled from warm_up before each step, so that
        # a CUDA graph of the step reads the current value.
        self._warm_up_factor = torch.zeros((), device=self.device)
        self.em_step = opts.em_step
        self.epoch, self.start_batch, self.global_step = 0, 0, 0
        self.best_iou = -math.inf
        self.bad_streak = 0
        self.stop_requested = False
        self._last_save = time.monotonic()
        self._last_batch = None
        self.writer = None
        if self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        if resuming:
            self._load(self.latest_path)
        # Built after any load: the graphs, captured in the first steps, point at the optimizer states.
        self._graphs = None
        if opts.cuda_graphs and self.device.type == "cuda":
            if self.dist.enabled:
                log.info("--cuda_graphs: off under torchrun (DistributedDataParallel's unused-parameter search "
                         "runs on the host at every step); the step runs eagerly")
            else:
                self._graphs = _StepGraphs([self.opt_d, self.opt_e], self.device)

    # ------------------------------------------------------------------ setup

    def _prepare_run_dir(self) -> bool:
        """Check the run folder against the command, write opts.yaml on a first start; True to resume.

        A folder with opts.yaml but no checkpoint (a run killed before its first one) starts again from
        scratch when the options match; a folder with a checkpoint needs --resume or --auto_resume.
        """
        o, opts_path = self.opts, self.run_dir / "opts.yaml"
        started = opts_path.exists()
        has_checkpoint = self.latest_path.is_file() or previous_generation(self.latest_path).is_file()
        barrier(self.dist)  # every rank looks before rank 0 writes
        if has_checkpoint and not (o.resume or o.auto_resume):
            raise FileExistsError(
                f"run folder {self.run_dir} already holds a run: pass --resume to continue it "
                "(--auto_resume in a job script), or choose another --name")
        if o.resume and not has_checkpoint:
            raise FileNotFoundError(
                f"--resume: {self.latest_path} not found; start without --resume (or use --auto_resume, "
                "which starts a run that has no checkpoint yet)")
        if started:
            check_same_options(o, opts_path)
        if self.dist.is_main:
            (self.run_dir / "ckpts").mkdir(parents=True, exist_ok=True)
            if not started:
                save_options(o, opts_path)
            elif not has_checkpoint:
                log.info("%s holds no checkpoint yet (the last attempt stopped before its first one): starting "
                         "it again", self.run_dir)
        barrier(self.dist)
        return has_checkpoint

    def _optimizers(self):
        o = self.opts
        betas = (o.beta1, 0.999)
        # The shape backbone moves at lr_shape_backbone x lr, from scratch too (the original's two
        # parameter groups); with a factor of 1 everything is one group.
        slow = self.encoder.shape_backbone_parameters() if o.lr_shape_backbone != 1 else []
        slow_ids = {id(p) for p in slow}
        fast = [p for p in self.encoder.parameters() if id(p) not in slow_ids]
        groups = [{"params": fast, "lr": o.lr}] + ([{"params": slow, "lr": o.lr_shape_backbone * o.lr}] if slow else [])
        enc_cls = torch.optim.AdamW if o.adamw else torch.optim.Adam
        # Fused: one kernel over all parameters instead of a dozen multi-tensor passes, and a step
        # that can be skipped on the device (see _step_unless); the same update up to rounding.
        opt_e = enc_cls(groups, lr=o.lr, betas=betas, weight_decay=o.wd, amsgrad=o.amsgrad, fused=True)
        opt_d = torch.optim.Adam(self.critic.parameters(), lr=o.lr, betas=betas, weight_decay=o.wd,
                                 amsgrad=o.amsgrad, fused=True)
        return opt_e, opt_d

    def _scheduler(self, optimizer):
        o, sched = self.opts, torch.optim.lr_scheduler
        eta_min = o.gamma * o.lr
        if o.scheduler == "step":
            return sched.StepLR(optimizer, step_size=max(1, round(0.8 * o.niter)), gamma=o.gamma)
        if o.scheduler in ("restart", "restart2", "restart1"):
            t0, mult = {"restart": (o.niter // 7 + 1, 2), "restart2": (o.niter // 3 + 1, 2),
                        "restart1": (o.niter // 2 + 1, 1)}[o.scheduler]
            return sched.CosineAnnealingWarmRestarts(optimizer, T_0=t0, T_mult=mult, eta_min=eta_min)
        if o.scheduler == "exp":
            return sched.ExponentialLR(optimizer, gamma=0.997)
        return sched.CosineAnnealingLR(optimizer, T_max=max(1, o.niter), eta_min=eta_min)

    def _dataset(self, split: str, threshold, aug: bool):
        o = self.opts
        extra = {"original_crop": True} if self.d.original_crop else {}
        if o.filter_test:
            extra["filter_test"] = True
        if o.train_repeats is not None:
            extra["train_repeats"] = o.train_repeats
        return build_dataset(o.dataset, root=o.dataroot, split=split, image_size=o.imageSize, ratio=o.ratio,
                             threshold=threshold, aug=aug, bg=o.bg, **extra)

    def _loader(self, dataset, sampler=None, shuffle=False, batch_size=None):
        o = self.opts
        workers = o.workers
        return DataLoader(
            SeededItems(dataset, o.manualSeed) if sampler is not None else dataset,
            batch_size=batch_size or o.batchSize, sampler=sampler, shuffle=shuffle,
            num_workers=workers, prefetch_factor=o.prefetch_factor if workers > 0 else None,
            persistent_workers=workers > 0 and sampler is not None,
            pin_memory=self.device.type == "cuda",
            # Its own generator: creating a loader iterator must not draw from the global RNG, or a
            # resumed run's random stream would be shifted by one draw.
            generator=torch.Generator().manual_seed(o.manualSeed),
            worker_init_fn=ignore_stop_signals,
        )

    def _build_data(self) -> None:
        o, d = self.opts, self.d
        if o.dataset in ("synthetic", "birds"):
            if self.dist.is_main:
                ensure_dataset(o, self.device)
            barrier(self.dist)
        train = self._dataset("train", d.threshold, aug=True)
        self.train_sampler = EpochSampler(len(train), o.batchSize, o.manualSeed, shuffle=True,
                                          rank=self.dist.rank, world_size=self.dist.world_size)
        self.train_loader = self._loader(train, sampler=self.train_sampler)
        clean = self._dataset("train", d.clean_threshold, aug=False)
        self.clean_sampler = EpochSampler(len(clean), o.batchSize, o.manualSeed, shuffle=False,
                                          rank=self.dist.rank, world_size=self.dist.world_size)
        self.clean_loader = self._loader(clean, sampler=self.clean_sampler)
        self.test_loader = self._loader(evaluation_split(o)) if self.dist.is_main else None
        if self.dist.is_main:
            log.info("data: %d train, %d clean, %d test images", len(train), len(clean), len(self.test_loader.dataset))

    # ------------------------------------------------------------------ one step

    def _render(self, attrs: Attributes):
        return render_attributes(attrs, self.template, self.d.height, self.d.width, with_background=self.opts.bg)

    def _encode(self, images: torch.Tensor, mode: int) -> Attributes:
        """The (training) encoder, under bf16 autocast with --amp; the attributes come out float32,
        so the renderer and the losses always compute in float32."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.opts.amp):
            return self.train_encoder(images, mode).float()

    def _score(self, critic: torch.nn.Module, images: torch.Tensor):
        """Critic scores (a tensor, or a list for the multi-scale critic) in float32; bf16 autocast
        inside with --amp."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.opts.amp):
            scores = critic(images)
        return scores.float() if isinstance(scores, torch.Tensor) else [m.float() for m in scores]

    def _critic_input(self, images: torch.Tensor) -> torch.Tensor:
        """(B,4,H,W) RGB+mask -> what the critic sees, per --unmask."""
        if self.opts.unmask == 2:
            return images
        rgb, mask = images[:, :3], images[:, 3:]
        return rgb if self.opts.unmask == 1 else rgb * mask + (1 - mask)

    def _random_camera(self, attrs: Attributes, batch: int) -> Attributes:
        o, d, dev = self.opts, self.d, self.device

        def uniform(lo, hi, *shape):
            return torch.rand(*shape, device=dev) * (hi - lo) + lo

        return replace(
            attrs,
            azimuth_deg=-uniform(-o.azi_scope / 2, o.azi_scope / 2, batch),
            elevation_deg=uniform(*d.elev_range, batch),
            distance=uniform(*d.dist_range, batch),
            offset=uniform(-o.bias_range, o.bias_range, batch, 2),
        )

    def _hard_azimuth(self, batch: int) -> torch.Tensor:
        h, dev = self.opts.hard_range, self.device
        narrow = torch.rand(batch, device=dev) * (180 - 2 * h) + h
        wide = torch.rand(batch, device=dev) * 180
        pick = torch.rand(batch, device=dev) < 0.5
        sign = torch.where(torch.rand(batch, device=dev) < 0.5, -1.0, 1.0)
        return -torch.where(pick, narrow, wide) * sign

    def _permutation(self, batch: int, bad: torch.Tensor) -> torch.Tensor:
        """A random permutation whose entries never point at a failed prediction (if any succeeded).

        An entry that points at a failed sample is replaced by the (position mod #good)-th good
        sample: the positions of such entries are random, so the replacement is too, and it is found
        on the device without a host synchronisation and without drawing from the random stream.
        """
        perm = torch.randperm(batch, device=self.device)
        good_first = torch.argsort(bad.to(torch.uint8), stable=True)  # good sample indices, then bad ones
        num_good = (~bad).sum()
        pick = good_first[torch.arange(batch, device=self.device) % num_good.clamp(min=1)]
        return torch.where(bad[perm] & (num_good > 0), pick, perm)

    def _regularisers(self, attrs: Attributes, face_normals: torch.Tensor) -> dict[str, torch.Tensor]:
        o, t = self.opts, self.template
        terms = {
            "laplacian": losses.laplacian_loss(attrs.delta_verts, t.laplacian),
            "flat": losses.flatness_loss(face_normals, t.edge_faces),
            "edge": losses.edge_length_loss(attrs.verts, t.edges),
            "deform": losses.deform_loss(attrs.delta_verts),
        }
        if o.lambda_depth > 0:
            terms["depth"] = losses.depth_loss(attrs.verts)
        if o.lambda_depthR > 0:
            terms["depthR"] = losses.depth_weighted_loss(attrs.verts, t.sign_init, o.ratio, "exp", o.temp)
        if o.lambda_depthC > 0:
            terms["depthC"] = losses.depth_weighted_loss(attrs.verts, t.sign_init, o.ratio, "quadratic", o.temp)
        return terms

    def _step(self, images: torch.Tensor, iteration: int) -> dict[str, torch.Tensor | float]:
        """One critic update and one encoder update on a (B,4,H,W) batch, replayed from a CUDA graph
        with --cuda_graphs.

        Returns the named loss terms as 0-dim tensors on the device (reading them is a host
        synchronisation: `_read_stats` does it in one transfer when logging; a graph's next replay
        overwrites them), or {} when a non-finite loss or gradient skipped the step. The step's one
        synchronisation reads whether it was skipped.
        """
        mode = mode_for_iteration(self.opts.update_shape, iteration)
        self._warm_up_factor.fill_(self.warm_up)
        if self._graphs is not None:
            out = self._graphs.run(self._device_step, mode, images)
        else:
            out = self._device_step(images.to(self.device, non_blocking=True), mode)
        critic_ok, step_ok = torch.stack([out.finite_d, out.finite]).tolist()  # the step's host synchronisation
        if not step_ok:
            return self._skip_step("critic", out.loss_d) if not critic_ok else self._skip_step("encoder", out.loss_e)
        self.bad_streak = 0
        self._last_batch = out.last_batch  # for the epoch's visuals
        return {**out.stats, "warm_up": self.warm_up}

    def _device_step(self, x: torch.Tensor, mode: int) -> _StepOutput:
        """The step's work on the device: both updates, skipped there on a non-finite loss or gradient (see
        `_step_unless`), with no host synchronisation and no tensor made from host data, so that it
        can be captured in a CUDA graph. `x` is the (B,4,H,W) batch on the device."""
        o, dev = self.opts, self.device
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batch = x.shape[0]

        ae = self._encode(x, mode)
        hard_azimuth = self._hard_azimuth(batch) if o.hard else None
        bad = bad_samples(ae.delta_verts.detach())
        aa, ab = ae.index(self._permutation(batch, bad)), ae.index(self._permutation(batch, bad))
        alphas = torch.rand(3, batch, device=dev)
        ai = self._random_camera(aa.lerp(ab, shape=alphas[0], texture=alphas[1], light=alphas[2]), batch)
        # The step's renders in one call: rendering is per sample, so this equals separate calls,
        # with a third of the launches.
        views = [ae, ai] + ([replace(ae, azimuth_deg=hard_azimuth)] if o.hard else [])
        out = self._render(Attributes.cat(views))
        rendered = as_image(out).split(batch)
        x_er, x_ir = rendered[0], rendered[1]
        x_er90 = rendered[2] if o.hard else x_er
        normals_e, normals_i = out.face_normals[:batch], out.face_normals[batch:2 * batch]
        aire = self._encode(x_ir.detach(), 0)

        # ---- critic (on detached renders), stepped before the encoders' adversarial term reads it
        real, fake90, fake_i = (self._critic_input(v) for v in (x, x_er90, x_ir))
        w = o.ganw
        critic_loss, generator_loss = self._gan_losses
        s_real, s_90, s_i = _split_scores(self._score(self.train_critic, torch.cat([real, fake90.detach(),
                                                                               fake_i.detach()])), batch)
        critic = partial(self._score, self.critic)
        gp = losses.gradient_penalty(critic, real, fake90.detach())
        if w != 0:
            gp = (gp + w * losses.gradient_penalty(critic, real, fake_i.detach())) / (1 + w)
        else:
            # --ganw 0 (the README's commands) weights the interpolated renders' penalty by 0: skip its
            # critic pass and double backward, but draw its mixing weights, so that a seed gives the
            # same run as with the penalty computed.
            torch.rand(batch, device=dev)
        d_terms = {
            "adv": o.lambda_gan * (critic_loss(s_real, s_90) + w * critic_loss(s_real, s_i)) / (1 + w),
            "gp": o.gan_reg * o.lambda_gan * gp,
        }
        loss_d = self._warm_up_factor * (d_terms["adv"] + d_terms["gp"])
        finite_d = self._finite_on_all_ranks(loss_d)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward(inputs=list(self.critic.parameters()))
        finite_d = _step_unless(self.opt_d, ~finite_d)

        # ---- encoders (the critic is only read here: its own gradients are not wanted)
        g_90, g_i = _split_scores(self._score(self.critic, torch.cat([fake90, fake_i])), batch)
        e_terms = {"gan": o.lambda_gan * (generator_loss(g_90) + w * generator_loss(g_i)) / (1 + w)}
        image_l1, mask_loss = losses.data_loss(x_er[:, :3], x_er[:, 3:], x[:, :3], x[:, 3:],
                                               contour_weight=o.lambda_contour)
        e_terms["data"] = o.lambda_data * (o.image_weight * image_l1 + mask_loss)
        reg_e, reg_i = self._regularisers(ae, normals_e), self._regularisers(ai, normals_i)
        weights = {"laplacian": o.lambda_reg * o.lambda_lpl, "flat": o.lambda_reg * o.lambda_flat,
                   "edge": o.lambda_edge, "deform": o.lambda_deform, "depth": o.lambda_depth,
                   "depthR": o.lambda_depthR, "depthC": o.lambda_depthC}
        for name in reg_e:
            e_terms[name] = weights[name] * (reg_e[name] + reg_i[name]) / 2
        flip = [losses.flip_loss(a.delta_verts, self.template.flip_index, self.template.sign_init, l1=o.flipL1)
                for a in (ae, ai, aire)]
        e_terms["flip"] = o.lambda_flipz * sum(flip) / 3
        if o.lambda_spread > 0:
            e_terms["spread"] = o.lambda_spread * losses.azimuth_spread_loss(ae.azimuth_deg)
        if o.lambda_ic > 0:
            e_terms["cycle"] = o.lambda_ic * losses.attribute_cycle_loss(
                aire, ai.detach(), azim_weight=o.azim, l1=o.L1, chamfer=o.chamfer)
        loss_e = self._warm_up_factor * sum(e_terms.values())
        # A skipped critic update skips the encoders' update too, as if the step had stopped there.
        finite = finite_d & self._finite_on_all_ranks(loss_e)
        self.opt_e.zero_grad(set_to_none=True)
        loss_e.backward(inputs=[p for p in self.encoder.parameters() if p.requires_grad])
        finite = _step_unless(self.opt_e, ~finite)

        stats = {f"D/{k}": v.detach() for k, v in d_terms.items()}
        stats.update({f"E/{k}": v.detach() for k, v in e_terms.items()})
        stats.update({"D/total": loss_d.detach(), "E/total": loss_e.detach(), "mask_iou": 1 - mask_loss.detach()})
        return _StepOutput(finite_d=finite_d, finite=finite, loss_d=loss_d.detach(), loss_e=loss_e.detach(),
                           stats=stats, last_batch=(x, x_er.detach(), x_ir.detach(), ae.detach()))

    def _finite_on_all_ranks(self, loss: torch.Tensor) -> torch.Tensor:
        """0-dim bool on the device: `loss` is finite on every rank (so that all ranks skip together);
        no host synchronisation."""
        finite = torch.isfinite(loss)
        if not self.dist.enabled:
            return finite
        flag = finite.float().reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return flag[0] > 0

    def _skip_step(self, which: str, loss: torch.Tensor) -> dict[str, float]:
        self.bad_streak += 1
        log.warning("non-finite %s loss or gradients (loss %s) at epoch %d step %d: step skipped (%d in a row)",
                    which, loss.item(), self.epoch, self.global_step, self.bad_streak)
        self.opt_d.zero_grad(set_to_none=True)
        self.opt_e.zero_grad(set_to_none=True)
        if self.bad_streak >= self.opts.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_streak} consecutive non-finite losses or gradients: stopping. The last good checkpoint is "
                f"{self.run_dir / 'ckpts' / 'latest.pt'}; lower --lr or check the data."
            )
        return {}

    # ------------------------------------------------------------------ epochs

    def fit(self, on_step: Callable[[Trainer], None] | None = None) -> None:
        """Train to `--niter` epochs (or until a stop is requested; then save and return)."""
        o = self.opts
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._on_signal)
        try:
            while self.epoch < o.niter:
                finished = self._train_epoch(on_step)
                if not finished:
                    self._save("interrupted")
                    return
                self._end_epoch()
                self.epoch, self.start_batch = self.epoch + 1, 0
                self._save("epoch")
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if self.writer is not None:
                self.writer.flush()

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C: the user insists
            raise KeyboardInterrupt
        log.warning("signal %d: finishing the current step, saving a checkpoint, then stopping", signum)
        self.stop_requested = True

    def _timed_save_due(self) -> bool:
        """True when --save_every_min minutes have passed since the last checkpoint, inside an epoch
        (its last step is followed by the epoch-end checkpoint anyway)."""
        minutes = self.opts.save_every_min
        return (minutes > 0 and self.start_batch < self.train_sampler.num_batches
                and time.monotonic() - self._last_save >= 60 * minutes)

    def _advance_warm_up(self) -> None:
        if self.epoch < self.opts.warm_epoch:
            self.warm_up = min(1.0, self.warm_up + 0.99 / self.warm_iterations)

    def _train_epoch(self, on_step) -> bool:
        self.encoder.train()
        self.critic.train()
        self.train_sampler.set_epoch(self.epoch, self.start_batch)
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch}/{self.opts.niter}", leave=False,
                   disable=not self.dist.is_main, dynamic_ncols=True)
        start, first_batch = time.perf_counter(), self.start_batch
        for i, batch in enumerate(bar, start=self.start_batch):
            self._advance_warm_up()
            stats = self._step(batch["images"], i)
            self.start_batch, self.global_step = i + 1, self.global_step + 1
            if stats and self.dist.is_main and (self.global_step % LOG_EVERY == 0 or i == 0):
                stats = _read_stats(stats)
                bar.set_postfix(D=f"{stats['D/total']:.3g}", E=f"{stats['E/total']:.3g}",
                                data=f"{stats['E/data']:.3g}", iou=f"{stats['mask_iou']:.3f}")
                for k, v in stats.items():
                    self.writer.add_scalar(f"train/{k}", v, self.global_step)
            if on_step is not None:
                on_step(self)
            # One collective for both: a signal on any rank stops all of them; a timed save is collective.
            stop, save = self._on_any_rank(self.stop_requested, self._timed_save_due())
            if stop:
                self.stop_requested = True
                return False
            if save:
                self._save("timed")
        if self.dist.is_main:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
            images = (self.start_batch - first_batch) * self.opts.batchSize * self.dist.world_size
            self.writer.add_scalar("train/images_per_s", images / seconds, self.epoch)
            log.info("epoch %d: %d images in %.1f s, %.1f images/s (all ranks)", self.epoch, images, seconds,
                     images / seconds)
        return True

    def _end_epoch(self) -> None:
        o, d, epoch = self.opts, self.d, self.epoch
        if self.swa is not None and epoch >= d.swa_start and epoch % o.swa_interval == 0:
            self.swa.update_parameters(self.encoder)
        self.sched_e.step()
        self.sched_d.step()
        if self.dist.is_main:
            self.writer.add_scalar("train/lr", self.opt_e.param_groups[0]["lr"], epoch)
            if (epoch % o.vis_every == 0 or epoch == o.niter - 1) and self._last_batch is not None:
                x, x_er, x_ir, ae = self._last_batch
                save_epoch_visuals(self.run_dir, epoch, x, x_er, x_ir, ae, self.template)
            if epoch % o.eval_every == 0 or epoch == o.niter - 1:
                self._evaluate(epoch)
        if o.em > 0 and epoch % o.em_gap == 0 and epoch < d.swa_start:
            self._update_template()

    def _evaluate(self, epoch: int) -> None:
        metrics = evaluate(self.encoder, self.test_loader, self.template, self.d.height, self.d.width, self.device,
                           initial_verts=self.initial_verts)
        line = {"epoch": epoch, "step": self.global_step, **metrics}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        for k, v in metrics.items():
            self.writer.add_scalar(f"test/{k}", v, epoch)
        log.info("epoch %d: %s", epoch, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if metrics["mask_iou"] > self.best_iou:
            self.best_iou = metrics["mask_iou"]
            self._save("best")

    @torch.no_grad()
    def _update_template(self) -> None:
        o = self.opts
        was_training = self.encoder.training
        self.encoder.eval()
        total = torch.zeros_like(self.template.verts)
        count = torch.zeros((), device=self.device)
        self.clean_sampler.set_epoch(self.epoch)
        for batch in self.clean_loader:
            attrs = self.encoder(batch["images"].to(self.device), 0)
            delta = attrs.delta_verts
            if o.white:
                delta = delta - delta.mean(dim=1, keepdim=True)
            keep = ~bad_samples(delta)
            total += delta[keep].sum(dim=0)
            count += keep.sum()
        all_reduce_sum(total, self.dist)
        all_reduce_sum(count, self.dist)
        result = step_template(self.template.verts, total, int(count), self.template.laplacian, em=o.em,
                               step=self.em_step, warm_up=self.warm_up, smooth=o.smooth, clip=o.clip,
                               white=o.white, reject_crossing=o.cross)
        if result.accepted:
            self._set_template(result.verts)
            self.em_step *= 0.99
            if o.update_bn:
                self._recompute_bn(self.encoder)
        log.info("template update at epoch %d: %d samples, %d z-crossings, %s", self.epoch, result.used,
                 result.crossings, "applied" if result.accepted else "rejected")
        self.encoder.train(was_training)

    def _set_template(self, verts: torch.Tensor) -> None:
        self.template = replace(self.template, verts=verts)
        self.encoder.set_template(verts)
        if self.swa is not None:
            self.swa.module.set_template(verts)

    def _recompute_bn(self, model: torch.nn.Module) -> None:
        """Re-estimate BatchNorm running statistics (train mode) over one pass of the training data, or
        over the first batches of it that hold --update_bn_images images."""
        was_training = model.training
        model.train()
        self.train_sampler.set_epoch(self.epoch)
        batches = (b["images"].to(self.device) for b in itertools.islice(self.train_loader, self.bn_batches))
        torch.optim.swa_utils.update_bn(batches, _ImagesOnly(model))
        model.train(was_training)

    @property
    def bn_batches(self) -> int:
        """Batches per process that the BatchNorm re-estimation passes (--update_bn_images)."""
        batches = self.train_sampler.num_batches
        if self.opts.update_bn_images > 0:
            per_batch = self.opts.batchSize * self.dist.world_size
            batches = min(batches, max(1, math.ceil(self.opts.update_bn_images / per_batch)))
        return batches

    # ------------------------------------------------------------------ checkpoints

    def _on_all_ranks(self, condition: bool) -> bool:
        """True when `condition` holds on every rank, so that ranks take the same branch (collective)."""
        if not self.dist.enabled:
            return condition
        flag = torch.tensor([1.0 if condition else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _on_any_rank(self, *conditions: bool) -> list[bool]:
        """For each condition, True when it holds on at least one rank (one collective for all of them)."""
        if not self.dist.enabled:
            return list(conditions)
        flags = torch.tensor([1.0 if c else 0.0 for c in conditions], device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return [bool(f) for f in flags.tolist()]

    def _state(self, resumable: bool = True) -> dict:
        """What a checkpoint holds. The best one is for evaluation only (load_run reads the encoders and
        the epoch), so it leaves out the critic, optimiser, scheduler and RNG states: a third of the size."""
        state = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "encoder": self.encoder.state_dict(),
            **({"swa_encoder": self.swa.module.state_dict()} if self.swa is not None else {}),
            "template": self.template.verts.detach().cpu(),
            "best_iou": self.best_iou,
        }
        if resumable:
            state.update({
                "next_batch": self.start_batch,
                "critic": self.critic.state_dict(),
                "opt_encoder": self.opt_e.state_dict(),
                "opt_critic": self.opt_d.state_dict(),
                "sched_encoder": self.sched_e.state_dict(),
                "sched_critic": self.sched_d.state_dict(),
                **({"swa_state": self.swa.state_dict()} if self.swa is not None else {}),
                "warm_up": self.warm_up,
                "em_step": self.em_step,
                "rng": self._all_rng_states(),
            })
        return state

    def _all_rng_states(self) -> list[dict]:
        """Every rank's generator states (collective: all ranks must call it), indexed by rank."""
        if not self.dist.enabled:
            return [rng_state()]
        states = [None] * self.dist.world_size
        torch.distributed.all_gather_object(states, rng_state())
        return states

    def _save(self, reason: str) -> None:
        # Resumable checkpoints gather every rank's RNG state (collective); the best one, saved by
        # rank 0 alone after its evaluation, is for evaluation only.
        state = self._state(resumable=reason != "best")
        if reason != "best":
            self._last_save = time.monotonic()
        if not self.dist.is_main:
            return
        bad = [n for n, p in self.encoder.state_dict().items() if p.is_floating_point() and not p.isfinite().all()]
        if bad:
            raise NonFiniteLossError(f"refusing to save a checkpoint with non-finite weights ({bad[:3]}...)")
        ckpts = self.run_dir / "ckpts"
        name = "best" if reason == "best" else "latest"
        save_checkpoint(state, ckpts / f"{name}.pt")
        # The learned template beside its checkpoint, readable by any mesh viewer.
        t = self.template
        save_obj(ckpts / f"{name}_template.obj", t.verts.cpu(), t.faces.cpu(), t.face_uvs.cpu())
        if reason in ("interrupted", "timed"):
            log.info("saved %s at epoch %d, batch %d%s", self.latest_path, self.epoch, self.start_batch,
                     ": continue with --resume" if reason == "interrupted" else "")

    def _load(self, path: Path) -> None:
        ckpt, path = load_newest(path, map_location=self.device)
        self.encoder.load_state_dict(ckpt["encoder"])
        self.critic.load_state_dict(ckpt["critic"])
        try:
            _load_optimizer(self.opt_e, ckpt["opt_encoder"])
        except ValueError as err:
            raise RuntimeError(
                f"{path}: its encoder optimiser has other parameter groups than this run ({err}). A run with "
                "from-scratch backbones started before --lr_shape_backbone existed resumes with --lr_shape_backbone 1"
            ) from err
        _load_optimizer(self.opt_d, ckpt["opt_critic"])
        self.sched_e.load_state_dict(ckpt["sched_encoder"])
        self.sched_d.load_state_dict(ckpt["sched_critic"])
        if self.swa is not None and "swa_state" in ckpt:
            self.swa.load_state_dict(ckpt["swa_state"])
        self._set_template(ckpt["template"].to(self.device))
        self.epoch, self.start_batch, self.global_step = ckpt["epoch"], ckpt["next_batch"], ckpt["global_step"]
        self.warm_up, self.em_step, self.best_iou = ckpt["warm_up"], ckpt["em_step"], ckpt["best_iou"]
        if self.start_batch >= self.train_sampler.num_batches:
            raise RunError(f"{path} points past the end of its epoch; the dataset changed since it was written")
        if len(ckpt["rng"]) != self.dist.world_size:
            raise RunError(f"{path} was written by {len(ckpt['rng'])} process(es); resume it with as many "
                               f"(torchrun --nproc_per_node={len(ckpt['rng'])}), not {self.dist.world_size}")
        set_rng_state(ckpt["rng"][self.dist.rank])
        log.info("resumed from %s: epoch %d, batch %d", path, self.epoch, self.start_batch)


def ensure_dataset(opts: argparse.Namespace, device: torch.device) -> None:
    """Generate the synthetic or bird dataset a run needs unless its cache is there (real datasets:
    nothing to do; they are prepared by the prepare scripts)."""
    d = derive(opts)
    if opts.dataset == "synthetic":
        ensure_synthetic(opts.dataroot, num_train=opts.synthetic_train, num_test=opts.synthetic_test,
                         image_size=opts.imageSize, ratio=opts.ratio, seed=opts.data_seed, ellipsoid=opts.ellipsoid,
                         elevation_range=d.elev_range, distance_range=d.dist_range, offset_range=opts.bias_range,
                         device=device)
    elif opts.dataset == "birds":
        ensure_birds(opts.dataroot, num_train=opts.synthetic_train, num_test=opts.synthetic_test,
                     image_size=opts.imageSize, seed=opts.data_seed, elevation_range=d.elev_range,
                     distance_range=d.dist_range, offset_range=opts.bias_range, spp=opts.birds_spp)


@dataclass(frozen=True)
class _StepOutput:
    """What one step leaves on the device (0-dim tensors unless said otherwise)."""

    finite_d: torch.Tensor  # bool: the critic's loss and gradients were finite (every rank): it was updated
    finite: torch.Tensor  # bool: both losses and all gradients were finite: the encoders were updated too
    loss_d: torch.Tensor
    loss_e: torch.Tensor
    stats: dict[str, torch.Tensor]  # the named loss terms
    last_batch: tuple  # (images, re-rendered, novel-view renders, attributes) for the epoch's visuals


class _StepGraphs:
    """The training step as CUDA graphs, one per encoder freeze mode (the only thing that changes the
    step's work from one iteration to the next: training batches are always full, see EpochSampler).

    Replaying a graph issues the step's ~9,000 kernels with one launch, instead of the host issuing them
    one by one. A mode's first `WARM_UP_STEPS` steps run eagerly on a side stream (Triton compilation,
    cuDNN's algorithm search and the optimizers' lazy state happen there, never inside a capture), the
    next one is captured and then replayed, and so is every later step of that mode. All of them are
    real training steps: a graph replays the same kernels on the same random stream as the eager step.

    A graph holds the addresses of everything it reads, so what changes during a run changes in place:
    the batch is copied into a static input, the warm-up factor is a device tensor (Trainer), the
    learning rates are device tensors the optimizers read during these steps and that are refreshed from
    the schedulers' values before each one, the template update copies into the encoder's buffer and
    the BatchNorm re-estimation refills the running statistics. The optimizers keep float learning rates
    and non-capturable groups outside these steps, so checkpoints are those of the eager step. A graph's
    outputs are static tensors, overwritten by its next replay.
    """

    WARM_UP_STEPS = 3  # eager steps per mode before its capture, as in PyTorch's whole-network example

    def __init__(self, optimizers: list[torch.optim.Optimizer], device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.groups = [g for opt in optimizers for g in opt.param_groups]
        self.lrs = [torch.full((), g["lr"], device=device) for g in self.groups]
        self.warm_steps: dict[int, int] = {}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, _StepOutput]] = {}

    def run(self, step: Callable[[torch.Tensor, int], _StepOutput], mode: int, images: torch.Tensor) -> _StepOutput:
        """Train one step of `mode` on the (B,4,H,W) host batch `images` with `step` (the trainer's
        device step, passed at each call rather than kept: a kept bound method would make a reference
        cycle through the trainer, which then outlives its last reference, and so do its loaders'
        worker processes, which a process waits for forever when it exits); no host synchronisation."""
        for lr, group in zip(self.lrs, self.groups, strict=True):
            lr.fill_(group["lr"])
        if mode in self.graphs:
            graph, static_images, out = self.graphs[mode]
            static_images.copy_(images, non_blocking=True)
            graph.replay()
            return out
        static_images = images.to(self.device, non_blocking=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._device_learning_rates():
            warmed = self.warm_steps.get(mode, 0)
            if warmed < self.WARM_UP_STEPS:
                self.warm_steps[mode] = warmed + 1
                with torch.cuda.stream(self.stream):
                    out = step(static_images, mode)
            else:
                graph = torch.cuda.CUDAGraph()
                # thread_local: the data loader's pin-memory thread keeps using CUDA during the capture.
                with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                    out = step(static_images, mode)
                self.graphs[mode] = (graph, static_images, out)
                graph.replay()  # the capture only recorded the step
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out

    @contextlib.contextmanager
    def _device_learning_rates(self) -> Iterator[None]:
        """Let fused Adam read the learning rates from the device tensors (which needs capturable groups)."""
        saved = [(g["lr"], g["capturable"]) for g in self.groups]
        for group, lr in zip(self.groups, self.lrs, strict=True):
            group["lr"], group["capturable"] = lr, True
        try:
            yield
        finally:
            for group, (lr, capturable) in zip(self.groups, saved, strict=True):
                group["lr"], group["capturable"] = lr, capturable


def _step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> torch.Tensor:
    """`optimizer.step()`, or no change at all (parameters, moments and step count) where the 0-dim
    bool `skip` is True or a gradient is not finite (a finite loss can have them), decided on the
    device. The fused Adam kernels read the flag as torch.amp.GradScaler hands it to them
    (`found_inf`); the tests check that a skip changes nothing. Returns the 0-dim bool "stepped"."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads:  # one norm per gradient, in a few fused kernels; a non-finite entry makes its norm so
        skip = skip | ~torch.stack(torch._foreach_norm(grads)).isfinite().all()
    optimizer.grad_scale, optimizer.found_inf = None, skip.float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    return ~skip


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state, written by this version or by one with unfused Adam: the saved
    groups' implementation choice (`fused`, `foreach`) is replaced by this optimizer's, which also
    moves the step counts where the fused kernels want them."""
    own = optimizer.param_groups[0]
    groups = [{**g, "fused": own["fused"], "foreach": own["foreach"]} for g in state["param_groups"]]
    optimizer.load_state_dict({**state, "param_groups": groups})


def _read_stats(stats: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """A step's statistics as floats, copied to the host in one transfer (a synchronisation)."""
    names = [k for k, v in stats.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([stats[k].float() for k in names]).tolist() if names else []
    return {**stats, **dict(zip(names, values, strict=True))}


def _split_scores(scores, batch: int):
    """Split critic outputs of a concatenated batch back into its parts: a (N,1) score tensor
    (WGAN critic) or a list of per-scale maps (multi-scale critic, giving one list per part)."""
    if isinstance(scores, torch.Tensor):
        return scores.split(batch)
    return tuple(list(part) for part in zip(*(m.split(batch) for m in scores), strict=True))


class _ImagesOnly(torch.nn.Module):
    """Adapter so torch.optim.swa_utils.update_bn can drive the encoder with image batches."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images):
        return self.encoder(images, 0)


@contextlib.contextmanager
def run_log(run_dir: Path, enabled: bool) -> Iterator[None]:
    """Copy the trainer's and the data loaders' log records (skipped files included) to run_dir/log.txt.

    The file is opened at the first record, so a start refused before logging anything leaves no
    log.txt behind; the handler is removed on exit, so runs in one process do not write to each other.
    """
    if not enabled:
        yield
        return
    handler = logging.FileHandler(run_dir / "log.txt", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    loggers = [log, logging.getLogger("datasets")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def run_lock(run_dir: Path, enabled: bool) -> Iterator[None]:
    """Hold the run for one job: a second job started on the same run folder (the same --name and
    --log_root, e.g. a job script submitted twice with --auto_resume) stops at once with a RunError
    instead of both writing the same checkpoints. The lock is the operating system's (flock on
    <log_root>/.<name>.lock, which names the holder), so a job killed in any way releases it."""
    if not enabled:
        yield
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunError(f"run {run_dir} is being trained by another job ({f.read().strip() or 'unknown'}); "
                           "wait for it to end, stop it, or choose another --name") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def train(opts: argparse.Namespace, on_step: Callable[[Trainer], None] | None = None) -> Trainer:
    """Run a whole training job (the entry point of the three training scripts)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dist_info = init_distributed("cuda" if resolve_device(opts.device).type == "cuda" else "cpu")
    try:
        start = time.time()
        run_dir = derive(opts).run_dir
        with run_lock(run_dir, dist_info.is_main), run_log(run_dir, dist_info.is_main):
            trainer = Trainer(opts, dist_info)
            trainer.fit(on_step)
            if dist_info.is_main:
                log.info("done in %.1f min: %s", (time.time() - start) / 60, trainer.run_dir)
        return trainer
    finally:
        shutdown(dist_info)
