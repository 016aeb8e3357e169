"""Benchmark (not a test): forward + backward time and peak memory per rasterizer backend.

Renders the 642-vertex / 1280-face icosphere template through `renderer.render.render` from random
plausible cameras (distance 2-7, elevation 0-30 deg, any azimuth, look-at offsets within +-0.1), with a
random texture and SH light (3, 0, ..., 0), then back-propagates mean(rgb) + mean(silhouette) to the
vertices and the texture. Each backend in `BACKENDS` becomes a column: add a rasterizer there.

Two tables: the whole `render` call, and the rasterizer call alone (the inputs `render` hands it,
forward + backward of fixed random weights on its features and soft mask), with the speed-up of the
Triton path over the others. On CUDA a third table gives the rasterizer's GPU time alone: the summed
duration of the kernels, copies and fills of one call, read with torch.profiler. The wall times
also hold the CPU's work (Python, autograd, launches), which at these sizes can exceed it. Backends:

* brute-force (CUDA): `brute_force_rasterize`, every pixel against every face in plain PyTorch,
  the straightforward dense pass of spec/renderer-math.md §5.3; it shows what the reference's
  sparse enumeration and the kernels save (CUDA only: one B = 8, 128x128 call took 129 s on a
  2-core CPU).
* reference: `rasterize_reference`, plain PyTorch (CPU and CUDA);
* triton: `renderer.rasterize_triton.rasterize_triton` (CUDA);
* nvdiffrast (CUDA, optional: `pip install diffrp-nvdiffrast`, which builds its plugin with nvcc on
  first use): rasterize + interpolate + antialias of the coverage, fed like Kaolin's nvdiffrast
  adapter (unshared corners, w = 1 so interpolation is affine as in DIB-R, culled faces clipped).
  Its antialiased silhouette is not DIB-R's soft mask (spec/renderer-math.md §5.2); it is the usual
  alternative, timed for comparison.

Peak memory: on CUDA, the peak of torch.cuda.memory_allocated above its value before the call; on the
CPU, the peak resident-set size above its value before the call (sampled every 0.5 ms after returning
freed heap memory to the OS), which counts the allocator's reuse of earlier memory as 0, so read it as
a lower bound; "n/a" where /proc/self/statm does not exist.

    python bench/render.py [--device cpu|cuda] [--batch 48] [--repeats 5] [--threads N] [--backends NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import importlib.util
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

import renderer.render
from renderer.mesh import Template
from renderer.rasterize import (
    MULTIPLIER,
    Rasterized,
    _barycentrics,
    _in_box,
    _nearest_feature,
    _pixel_centres,
    check_inputs,
    rasterize_reference,
)

BRUTE_FORCE_PAIRS = 1 << 23  # pixel-face pairs per chunk of the brute-force backend (2.5-4 GB peak at these sizes)


@dataclass(frozen=True)
class Backend:
    name: str
    rasterize: Callable[..., Rasterized]  # same signature as renderer.rasterize.rasterize
    devices: tuple[str, ...]  # device types it runs on
    missing: Callable[[], str | None] = lambda: None  # why it cannot run here, None when it can


def brute_force_rasterize(face_verts_image, face_verts_z, face_features, face_normals_z, height, width,
                          sigma_inv=7000.0, box_len=0.02, knum=30) -> Rasterized:
    """DIB-R the obvious way: every pixel against every face, faces in chunks, plain autograd.

    The dense pass of spec/renderer-math.md §5.3, the baseline the fast path's speed target was set
    against, to show what the reference's enumeration of each face's box and the Triton kernels
    save. Same results as `rasterize_reference` (tests/test_rasterize.py); faces with a non-finite
    corner are ignored as there. Each chunk holds about `BRUTE_FORCE_PAIRS` pairs; the soft-mask
    chunks are recomputed in the backward (torch.utils.checkpoint), so only their inputs and the
    (B, H·W, F) bool candidate flags stay.
    """
    check_inputs(face_verts_image, face_verts_z, face_features, face_normals_z, height, width,
                 sigma_inv, box_len, knum)
    batch, num_faces, _, channels = face_features.shape
    pixels = height * width
    xs, ys = _pixel_centres(height, width, face_verts_image.dtype, face_verts_image.device)
    px, py = xs.repeat(height), ys.repeat_interleave(width)  # (H·W,), row-major pixel order
    col_x, col_y = px[:, None], py[:, None]  # (H·W, 1), against a chunk's faces (B, 1, f)
    depth = face_verts_z.detach()
    finite = face_verts_image.detach().isfinite().flatten(2).all(2) & depth.isfinite().all(2)  # (B, F)
    verts = torch.where(finite[..., None, None], face_verts_image, 0.0) * MULTIPLIER  # scaled units
    chunk = max(1, BRUTE_FORCE_PAIRS // (batch * pixels))
    parts = [slice(start, min(start + chunk, num_faces)) for start in range(0, num_faces, chunk)]

    with torch.no_grad():  # hard pass: running nearest face, strict-greater update in index order
        active = finite & (face_normals_z >= 0)
        best_z = verts.new_full((batch, pixels), -torch.inf)
        best_face = torch.full((batch, pixels), -1, dtype=torch.long, device=verts.device)
        for part in parts:
            v = verts[:, None, part].detach()  # (B, 1, f, 3, 2)
            w = _barycentrics(v, col_x, col_y)  # (B, H·W, f, 3)
            hit = (w >= 0).all(-1) & _in_box(col_x, col_y, v.amin(-2), v.amax(-2)) & active[:, None, part]
            z = depth[:, None, part]
            z = w[..., 0] * z[..., 0] + w[..., 1] * z[..., 1] + w[..., 2] * z[..., 2]
            chunk_z, chunk_face = torch.where(hit, z, -torch.inf).max(-1)  # the first maximum
            better = chunk_z > best_z
            best_z = torch.where(better, chunk_z, best_z)
            best_face = torch.where(better, chunk_face + part.start, best_face)

    covered = best_face >= 0
    winner = best_face.clamp(min=0)[..., None, None]
    weights = _barycentrics(verts.gather(1, winner.expand(batch, pixels, 3, 2)), px, py)  # (B, H·W, 3)
    corner_features = face_features.gather(1, winner.expand(batch, pixels, 3, channels))
    features = torch.where(covered[..., None], (weights[..., None] * corner_features).sum(2), 0.0)

    margin = box_len * MULTIPLIER
    outside = verts.new_ones(batch, pixels)  # prod(1 - P) over each pixel's accepted candidates
    seen = torch.zeros(batch, pixels, dtype=torch.long, device=verts.device)
    for part in parts:
        with torch.no_grad():
            v = verts[:, None, part].detach()
            candidate = _in_box(col_x, col_y, v.amin(-2) - margin, v.amax(-2) + margin) & finite[:, None, part]
            accepted = candidate & (seen[..., None] + candidate.cumsum(-1) <= knum)  # first knum by index
            seen += candidate.sum(-1)
        outside = outside * torch.utils.checkpoint.checkpoint(
            _dense_outside, verts[:, part], accepted, px, py, float(sigma_inv), use_reentrant=False)
    soft_mask = torch.where(covered, 1.0, 1.0 - outside)  # 1 on covered pixels, whatever their candidates
    return Rasterized(features=features.reshape(batch, height, width, channels),
                      soft_mask=soft_mask.reshape(batch, height, width),
                      face_idx=best_face.reshape(batch, height, width))


def _dense_outside(corners: torch.Tensor, accepted: torch.Tensor, px: torch.Tensor, py: torch.Tensor,
                   sigma_inv: float) -> torch.Tensor:
    """(B, H·W) prod(1 - P) over the accepted (B, H·W, f) candidates among faces `corners` (B, f, 3, 2)."""
    batch, pixels, faces = accepted.shape
    v = corners[:, None].expand(batch, pixels, faces, 3, 2).reshape(-1, 3, 2)
    p = torch.stack((px, py), dim=-1)[None, :, None].expand(batch, pixels, faces, 2).reshape(-1, 2)
    d2, _ = _nearest_feature(v, p)
    prob = torch.exp(-(sigma_inv * d2 / MULTIPLIER / MULTIPLIER)).reshape(batch, pixels, faces)
    return torch.where(accepted, 1.0 - prob, 1.0).prod(-1)


def triton_rasterize(*args) -> Rasterized:
    from renderer.rasterize_triton import rasterize_triton

    return rasterize_triton(*args)


def triton_missing() -> str | None:
    return None if importlib.util.find_spec("triton") else "triton is not installed"


@functools.cache
def nvdiffrast_context():
    """nvdiffrast.torch and a CUDA rasterizer context; the first call builds nvdiffrast's plugin."""
    import nvdiffrast
    import nvdiffrast.torch as dr
    import torch.utils.cpp_extension

    # nvdiffrast builds its plugin with torch.utils.cpp_extension.load and then imports it by name;
    # PyTorch 2 no longer puts the build directory on sys.path, so add it first.
    plugin = dr.ops.sanitize_name(f"nvdiffrast_plugin_{nvdiffrast.__version__}_torch{torch.__version__}")
    sys.path.insert(0, torch.utils.cpp_extension._get_build_directory(plugin, False))
    return dr, dr.RasterizeCudaContext()


def nvdiffrast_missing() -> str | None:
    if importlib.util.find_spec("nvdiffrast") is None:
        return "nvdiffrast is not installed (pip install diffrp-nvdiffrast)"
    try:
        nvdiffrast_context()
    except (ImportError, OSError, RuntimeError) as error:
        return f"nvdiffrast could not be built or loaded: {error}"
    return None


def nvdiffrast_rasterize(face_verts_image, face_verts_z, face_features, face_normals_z, height, width,
                         *dibr_settings) -> Rasterized:
    """nvdiffrast rasterize + interpolate + antialias with the rasterizer's contract (float32, CUDA).

    The DIB-R settings (sigma_inv, box_len, knum) have no counterpart and are ignored; soft_mask is the
    antialiased hard coverage.
    """
    dr, context = nvdiffrast_context()
    batch, num_faces = face_normals_z.shape
    # clip-space corners (x, -y, depth, w): w = 1 keeps interpolation affine; w = -1 clips culled
    # faces; y is negated because nvdiffrast's row 0 is at the bottom; depth in (0, 1], nearer smaller
    w = torch.where(face_normals_z >= 0, 1.0, -1.0)[..., None].expand(batch, num_faces, 3)
    depth = -face_verts_z / face_verts_z.detach().abs().amax(dim=(1, 2), keepdim=True)
    pos = torch.stack((face_verts_image[..., 0], -face_verts_image[..., 1], depth * w, w), dim=-1)
    pos = pos.reshape(batch, 3 * num_faces, 4).contiguous()
    tri = torch.arange(3 * num_faces, dtype=torch.int32, device=pos.device).reshape(num_faces, 3)
    rast, _ = dr.rasterize(context, pos, tri, resolution=[height, width], grad_db=False)
    features, _ = dr.interpolate(face_features.reshape(batch, 3 * num_faces, -1).contiguous(), rast, tri)
    coverage = (rast[..., 3:] > 0).to(pos.dtype)
    soft_mask = dr.antialias(coverage, rast, pos, tri)[..., 0]
    return Rasterized(features=features, soft_mask=soft_mask, face_idx=rast[..., 3].long() - 1)


BACKENDS = [
    Backend("brute-force", brute_force_rasterize, ("cuda",)),
    Backend("reference", rasterize_reference, ("cpu", "cuda")),
    Backend("triton", triton_rasterize, ("cuda",), triton_missing),
    Backend("nvdiffrast", nvdiffrast_rasterize, ("cuda",), nvdiffrast_missing),
]


@contextlib.contextmanager
def rasterizing_with(backend: Backend) -> Iterator[None]:
    """Make `renderer.render.render` call this backend's rasterizer instead of the dispatching entry."""
    original = renderer.render.rasterize
    renderer.render.rasterize = backend.rasterize
    try:
        yield
    finally:
        renderer.render.rasterize = original


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
    out = renderer.render.render(**scene)
    (out.rgb.mean() + out.silhouette.mean()).backward()
    scene["verts"].grad = None
    scene["texture"].grad = None


def rasterizer_step(backend: Backend, scene: dict) -> Callable[[], None]:
    """Forward + backward of the backend's rasterizer alone, on the inputs `render(**scene)` gives it."""
    captured = []
    with rasterizing_with(Backend("capture", lambda *args: captured.append(args) or backend.rasterize(*args),
                                  backend.devices)):
        renderer.render.render(**scene)
    face_verts_image, face_verts_z, face_features, face_normals_z, height, width = captured[0]
    face_verts_image = face_verts_image.detach().requires_grad_(True)
    face_features = face_features.detach().requires_grad_(True)
    face_verts_z, face_normals_z = face_verts_z.detach(), face_normals_z.detach()
    out = backend.rasterize(face_verts_image, face_verts_z, face_features, face_normals_z, height, width)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.rand(t.shape, generator=gen).to(t.device) for t in (out.features, out.soft_mask)]

    def step() -> None:
        out = backend.rasterize(face_verts_image, face_verts_z, face_features, face_normals_z, height, width)
        torch.autograd.backward([out.features, out.soft_mask], weights)
        face_verts_image.grad = None
        face_features.grad = None

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(step: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median wall time of one forward + backward, after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def gpu_ms(step: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Summed duration of the GPU activity (kernels, copies, fills) of one call, from torch.profiler."""
    step()
    synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        synchronize(device)
    busy_us = sum(event.time_range.elapsed_us() for event in prof.events()
                  if event.device_type == torch.autograd.DeviceType.CUDA)
    return busy_us / 1000 / repeats


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_mib(step: Callable[[], None], device: torch.device) -> str:
    """Peak memory of one forward + backward above what was held before it (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
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
    step()
    running = False
    sampler.join()
    return f"{(peak - before) / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available); some backends run on cuda only")
    parser.add_argument("--batch", type=int, default=48, help="batch of the main rows (a B=8 row is added)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cell (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    names = [backend.name for backend in BACKENDS]
    parser.add_argument("--backends", nargs="+", choices=names, default=names, metavar="NAME",
                        help=f"columns to run, of {', '.join(names)} (default: all that can run here; "
                        "brute-force is by far the slowest)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    template = Template.icosphere()
    backends = []
    for backend in (b for b in BACKENDS if b.name in args.backends):
        reason = backend.missing() if device.type in backend.devices else f"runs on {', '.join(backend.devices)} only"
        if reason is None:
            backends.append(backend)
        else:
            print(f"{backend.name}: skipped, {reason}")
    rows = [(args.batch, 128, 128), (args.batch, 128, 64), (args.batch, 160, 96), (8, 128, 128)]

    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}{threads}; torch {torch.__version__}; mesh {len(template.verts)} verts / "
          f"{len(template.faces)} faces; float32; median of {args.repeats} calls")
    timed = {"render() forward + backward": [], "rasterizer alone, forward + backward": []}
    gpu_rows = []
    for batch, height, width in rows:
        render_cells, raster_cells, gpu_cells = {}, {}, {}
        for backend in backends:
            gen = torch.Generator().manual_seed(0)
            scene = make_scene(template, batch, height, width, device, gen)
            render_step = functools.partial(forward_backward, scene)
            with rasterizing_with(backend):
                render_cells[backend.name] = (time_ms(render_step, device, args.repeats),
                                              peak_mib(render_step, device))
            step = rasterizer_step(backend, scene)
            raster_cells[backend.name] = (time_ms(step, device, args.repeats), peak_mib(step, device))
            if device.type == "cuda":
                gpu_cells[backend.name] = gpu_ms(step, device, args.repeats)
        size = (batch, height, width)
        for table, cells in zip(timed.values(), (render_cells, raster_cells), strict=True):
            table.append((size, cells))
        gpu_rows.append((size, gpu_cells))
    names = [backend.name for backend in backends]
    for title, rows_cells in timed.items():
        print_table(title, names, rows_cells, ("ms", "peak MiB"), lambda cell: f"{cell[0]:.2f} | {cell[1]}",
                    lambda cell: cell[0])
    if device.type == "cuda":
        print_table("rasterizer alone, GPU time of one forward + backward (torch.profiler)", names, gpu_rows,
                    ("GPU ms",), lambda ms: f"{ms:.3f}", lambda ms: ms)


def print_table(title: str, names: list[str], rows_cells: list, columns: tuple[str, ...],
                cell_text: Callable, cell_ms: Callable) -> None:
    """One markdown table: a row per (B, H, W), the `columns` of each backend (`cell_text` writes a
    cell's), then each other backend's time over Triton's (`cell_ms` reads a cell's time)."""
    others = [name for name in names if name != "triton"] if "triton" in names else []
    print(f"\n{title}\n")
    print("| B | H x W | " + " | ".join(f"{n} {c}" for n in names for c in columns)
          + "".join(f" | {n} / triton" for n in others) + " |")
    print("|" + "---|" * (2 + len(columns) * len(names) + len(others)))
    for (batch, height, width), cells in rows_cells:
        values = [cell_text(cells[n]) for n in names]
        values += [f"{cell_ms(cells[n]) / cell_ms(cells['triton']):.1f}x" for n in others]
        print(f"| {batch} | {height} x {width} | " + " | ".join(values) + " |")

if __name__ == "__main__":
    main()
