"""Benchmark (not a test): forward + backward time and peak memory of the full render, per rasterizer.

Renders the 642-vertex / 1280-face icosphere template through `renderer.render.render` from random
plausible cameras (distance 2-7, elevation 0-30 deg, any azimuth, look-at offsets within +-0.1), with a
random texture and SH light (3, 0, ..., 0), then back-propagates mean(rgb) + mean(silhouette) to the
vertices and the texture. Each backend in `BACKENDS` becomes a column: add a rasterizer there.

Peak memory: on CUDA, the peak of torch.cuda.memory_allocated above its value before the call; on the
CPU, the peak resident-set size above its value before the call (sampled every 0.5 ms after returning
freed heap memory to the OS), which counts the allocator's reuse of earlier memory as 0, so read it as
a lower bound; "n/a" where /proc/self/statm does not exist.

    python bench/render.py [--device cpu|cuda] [--batch 48] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from renderer.mesh import Template
from renderer.rasterize import Rasterized, rasterize_reference

# the module itself: the package re-exports its `render` function under the same name
render_module = importlib.import_module("renderer.render")


@dataclass(frozen=True)
class Backend:
    name: str
    rasterize: Callable[..., Rasterized]  # same signature as renderer.rasterize.rasterize
    devices: tuple[str, ...]  # device types it runs on


BACKENDS = [
    Backend("reference", rasterize_reference, ("cpu", "cuda")),
]


@contextlib.contextmanager
def rasterizing_with(backend: Backend) -> Iterator[None]:
    """Make `renderer.render.render` call this backend's rasterizer instead of the dispatching entry."""
    original = render_module.rasterize
    render_module.rasterize = backend.rasterize
    try:
        yield
    finally:
        render_module.rasterize = original


def make_scene(template: Template, batch: int, height: int, width: int, device: torch.device,
               gen: torch.Generator) -> dict:
    """Keyword arguments of `render` for `batch` random views of the template (float32)."""

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return (low + (high - low) * torch.rand(*shape, generator=gen)).to(device)

    light = torch.zeros(batch, 9)
    light[:, 0] = 3.0
    return dict(
        verts=template.verts.to(device).expand(batch, -1, -1).clone().requires_grad_(True),
        faces=template.faces.to(device),
        face_uvs=template.face_uvs.to(device),
        azimuth_deg=uniform(0.0, 360.0, batch),
        elevation_deg=uniform(0.0, 30.0, batch),
        distance=uniform(2.0, 7.0, batch),
        offset=uniform(-0.1, 0.1, batch, 2),
        texture=uniform(0.0, 1.0, batch, 3, height, width).requires_grad_(True),
        light=light.to(device),
        height=height,
        width=width,
    )


def forward_backward(scene: dict) -> None:
    out = render_module.render(**scene)
    (out.rgb.mean() + out.silhouette.mean()).backward()
    scene["verts"].grad = None
    scene["texture"].grad = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(scene: dict, device: torch.device, repeats: int) -> float:
    """Median wall time of one forward + backward, after one warm-up call."""
    forward_backward(scene)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        forward_backward(scene)
        synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_mib(scene: dict, device: torch.device) -> str:
    """Peak memory of one forward + backward above what was held before it (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        forward_backward(scene)
        synchronize(device)
        return f"{(torch.cuda.max_memory_allocated(device) - before) / 2**20:.0f}"
    if not os.path.exists("/proc/self/statm"):
        return "n/a"
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc only: hand freed heap pages back first
    before = _resident_bytes()
    peak = before
    running = True

    def sample() -> None:
        nonlocal peak
        while running:
            peak = max(peak, _resident_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    forward_backward(scene)
    running = False
    sampler.join()
    return f"{(peak - before) / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=48, help="batch of the main rows (a B=8 row is added)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cell (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    template = Template.icosphere()
    backends = [backend for backend in BACKENDS if device.type in backend.devices]
    rows = [(args.batch, 128, 128), (args.batch, 128, 64), (args.batch, 160, 96), (8, 128, 128)]

    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}{threads}; torch {torch.__version__}; mesh {len(template.verts)} verts / "
          f"{len(template.faces)} faces; forward+backward of render(), median of {args.repeats}")
    header = "| B | H x W | " + " | ".join(f"{b.name} ms | {b.name} peak MiB" for b in backends) + " |"
    print(header)
    print("|" + "---|" * (2 + 2 * len(backends)))
    for batch, height, width in rows:
        cells = []
        for backend in backends:
            gen = torch.Generator().manual_seed(0)
            scene = make_scene(template, batch, height, width, device, gen)
            with rasterizing_with(backend):
                cells += [f"{time_ms(scene, device, args.repeats):.1f}", peak_mib(scene, device)]
        print(f"| {batch} | {height} x {width} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
