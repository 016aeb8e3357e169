"""The attribute set an image is explained by: camera, mesh, texture, light, background."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Attributes:
    """Everything the renderer needs for a batch of B images (float tensors on one device).

    ``dataclasses.replace(attrs, azimuth_deg=...)`` swaps single fields.
    """

    azimuth_deg: Tensor          # (B,) degrees; 0 puts the camera on +z, looking at the front
    elevation_deg: Tensor        # (B,) degrees
    distance: Tensor             # (B,) camera distance from the world origin
    offset: Tensor               # (B, 2) look-at point (x, y) in the z = 0 plane
    verts: Tensor                # (B, V, 3) object-frame vertices = template + delta_verts
    delta_verts: Tensor          # (B, V, 3) predicted offsets from the template
    texture: Tensor              # (B, 3, 2H, W) UV texture map
    light: Tensor                # (B, 9) spherical-harmonic coefficients
    background: Tensor | None = None  # (B, 3, H, W) in [0, 1], or None without --bg

    def __post_init__(self) -> None:
        sizes = {f.name: getattr(self, f.name).shape[0] for f in fields(self) if getattr(self, f.name) is not None}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"attribute batch sizes differ: {sizes}")

    @property
    def batch_size(self) -> int:
        return self.azimuth_deg.shape[0]

    def _map(self, fn) -> Attributes:
        return Attributes(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                             for f in fields(self)})

    def detach(self) -> Attributes:
        """The same values, cut from the autograd graph."""
        return self._map(Tensor.detach)

    def float(self) -> Attributes:
        """The same values in float32 (fields already float32 are returned as they are, not copied)."""
        return self._map(Tensor.float)

    def index(self, index: Tensor) -> Attributes:
        """Samples ``index`` (N,) int64 of the batch, e.g. a permutation; gradients flow back."""
        return self._map(lambda t: t[index])

    @staticmethod
    def cat(parts: list[Attributes]) -> Attributes:
        """Concatenate attribute sets along the batch (all with a background, or none); gradients flow
        back to each part. Rendering the concatenation equals rendering the parts one by one."""
        def join(name: str) -> Tensor | None:
            values = [getattr(a, name) for a in parts]
            if all(v is None for v in values):
                return None
            if any(v is None for v in values):
                raise ValueError("cannot concatenate attributes with and without a background")
            return torch.cat(values)

        return Attributes(**{f.name: join(f.name) for f in fields(Attributes)})

    def with_camera(self, azimuth_deg: Tensor, elevation_deg: Tensor, distance: Tensor, offset: Tensor) -> Attributes:
        """The same object seen from another camera (shapes as the fields)."""
        return replace(self, azimuth_deg=azimuth_deg, elevation_deg=elevation_deg, distance=distance, offset=offset)

    def lerp(self, other: Attributes, shape: Tensor | float, texture: Tensor | float,
             light: Tensor | float) -> Attributes:
        """Per-sample interpolation ``self + t·(other − self)`` with separate weights (torch.lerp).

        Args:
            other: attributes of the same batch size.
            shape: (B,) or scalar weight for ``verts`` and ``delta_verts``.
            texture: (B,) or scalar weight for ``texture`` and ``background``.
            light: (B,) or scalar weight for ``light``.

        Returns:
            New attributes. The camera is not interpolated: the result keeps ``self``'s camera, to be
            replaced (``with_camera``) by the sampled camera of the novel view.
        """

        def mix(a: Tensor | None, b: Tensor | None, t: Tensor | float) -> Tensor | None:
            if a is None or b is None:
                if a is not None or b is not None:
                    raise ValueError("cannot interpolate attributes with and without a background")
                return None
            if isinstance(t, Tensor):
                t = t.to(a.dtype).reshape(-1, *([1] * (a.dim() - 1)))
            return torch.lerp(a, b, t)

        return replace(
            self,
            verts=mix(self.verts, other.verts, shape),
            delta_verts=mix(self.delta_verts, other.delta_verts, shape),
            texture=mix(self.texture, other.texture, texture),
            background=mix(self.background, other.background, texture),
            light=mix(self.light, other.light, light),
        )
