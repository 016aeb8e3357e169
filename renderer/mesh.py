"""Triangle meshes: the icosphere template with UVs, .obj I/O and the fixed per-template structures.

Tensor vocabulary: ``verts`` (V, 3) or (B, V, 3) float; ``faces`` (F, 3) int64 vertex indices,
counter-clockwise seen from outside; ``face_uvs`` (F, 3, 2) per-corner texture coordinates in
[0, 1] with v = 0 at the bottom of the texture image (OBJ / OpenGL convention).
"""

import itertools
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def _icosahedron() -> tuple[Tensor, Tensor]:
    """Unit icosahedron, float64, with the coordinate planes as mirror planes.

    Vertices are the cyclic permutations of (0, ±1, ±φ). Every coordinate plane maps this vertex set
    onto itself, so the subdivided sphere is exactly symmetric under z → −z (needed by the
    flip-index symmetry loss). Faces are the 20 triples of mutually adjacent vertices, wound so that
    their normal points away from the centre.
    """
    phi = (1.0 + math.sqrt(5.0)) / 2.0
    corners = []
    for s1, s2 in itertools.product((-1.0, 1.0), repeat=2):
        corners += [(0.0, s1, s2 * phi), (s1, s2 * phi, 0.0), (s2 * phi, 0.0, s1)]
    verts = torch.tensor(corners, dtype=torch.float64)
    faces = []
    for a, b, c in itertools.combinations(range(len(corners)), 3):
        tri = verts[[a, b, c]]
        # Icosahedron edges have length 2; any other pair of vertices is farther apart.
        sides = torch.linalg.vector_norm(tri - tri.roll(1, dims=0), dim=-1)
        if torch.allclose(sides, torch.full_like(sides, 2.0)):
            normal = torch.linalg.cross(tri[1] - tri[0], tri[2] - tri[0], dim=-1)
            faces.append((a, b, c) if torch.dot(normal, tri.sum(0)) > 0 else (a, c, b))
    verts = verts / torch.linalg.vector_norm(verts, dim=-1, keepdim=True)
    return verts, torch.tensor(faces, dtype=torch.int64)


def _subdivide(verts: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:
    """Split every face into four at its edge midpoints, pushed out onto the unit sphere.

    New vertices follow the old ones, in the order of :func:`unique_edges`. Winding is preserved.
    """
    face_edges = torch.stack([faces, faces.roll(-1, dims=1)], dim=-1).reshape(-1, 2)  # (3F, 2)
    edges, edge_id = torch.unique(face_edges.sort(dim=-1).values, dim=0, return_inverse=True)
    mid = verts[edges[:, 0]] + verts[edges[:, 1]]
    mid = mid / torch.linalg.vector_norm(mid, dim=-1, keepdim=True)
    m = (edge_id + len(verts)).reshape(-1, 3)  # m[:, k] is the midpoint of corner k -> corner k+1
    a, b, c = faces.unbind(dim=1)
    m_ab, m_bc, m_ca = m.unbind(dim=1)
    new_faces = torch.stack(
        [
            torch.stack([a, m_ab, m_ca], dim=1),
            torch.stack([m_ab, b, m_bc], dim=1),
            torch.stack([m_ca, m_bc, c], dim=1),
            torch.stack([m_ab, m_bc, m_ca], dim=1),
        ],
        dim=1,
    ).reshape(-1, 3)
    return torch.cat([verts, mid]), new_faces


def _sphere_face_uvs(verts: Tensor, faces: Tensor) -> Tensor:
    """Per-corner UVs in the layout of the original ``sphere.obj`` (model-training.md §3.1).

    With n̂ the unit direction of a vertex: ``u = 0.5 + asin(n̂_x)/π`` and
    ``v = (atan2(n̂_z, −n̂_y) mod 2π) / 2π`` (v = 0 bottom pole, 0.25 front, 0.5 top, 0.75 back).

    Seam fix: v jumps from 1 back to 0 along the half circle z = 0, y < 0. Faces touching it from
    behind (z < 0) have corners at v = 0 on the seam and near 1 elsewhere, and a few faces cross it
    (the circle runs along edges near −y but through face medians towards the ±x poles). In every
    face whose corners span more than half the v range, the corners below 0.5 are moved up by 1 and
    then clamped to 1: seam corners of the back faces read v = 1, corners of crossing faces on the
    front side are snapped to v = 1 (the original ``sphere.obj`` snaps such corners to 0 or 1 too).
    v = 0 and v = 1 are the same bottom-pole meridian on the surface, and the method's texture
    ``[tex; vflip(tex)]`` has equal first and last rows, so the snap only squeezes the texture of the
    crossing faces a little. The two u-poles (±x) have no defined v; a pole corner takes the mean v
    of the face's two other corners. Mirroring through z = 0 maps v to 1 − v in every face but the
    crossing ones.
    """
    n = verts / torch.linalg.vector_norm(verts, dim=-1, keepdim=True)
    u = 0.5 + torch.asin(n[:, 0].clamp(-1.0, 1.0)) / math.pi
    v = torch.remainder(torch.atan2(n[:, 2], -n[:, 1]), 2.0 * math.pi) / (2.0 * math.pi)
    is_pole = torch.hypot(n[:, 1], n[:, 2]) < 1e-9
    corner_u, corner_v, corner_pole = u[faces], v[faces], is_pole[faces]  # (F, 3) each

    v_range = corner_v.masked_fill(corner_pole, -math.inf).amax(1) - corner_v.masked_fill(corner_pole, math.inf).amin(1)
    spans_seam = v_range > 0.5
    corner_v = torch.where(spans_seam[:, None] & (corner_v < 0.5), corner_v + 1.0, corner_v).clamp(max=1.0)

    off_pole_mean = (corner_v * ~corner_pole).sum(1, keepdim=True) / (~corner_pole).sum(1, keepdim=True)
    corner_v = torch.where(corner_pole, off_pole_mean, corner_v)
    return torch.stack([corner_u, corner_v], dim=-1)


def icosphere(subdivisions: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """Subdivided icosahedron of radius 0.5 with per-corner UVs.

    Level s has 10·4^s + 2 vertices, 20·4^s faces and 30·4^s edges (level 3: 642 / 1280 / 1920);
    the 12 icosahedron vertices have degree 5, all others 6. The vertex set is exactly symmetric under
    z → −z, with 4·2^s vertices on the plane z = 0 (32 at level 3).

    Args:
        subdivisions: number of 1-to-4 subdivisions, >= 0.

    Returns:
        verts (V, 3) float32, faces (F, 3) int64 outward counter-clockwise, face_uvs (F, 3, 2)
        float32 in [0, 1] (layout: see :func:`_sphere_face_uvs`).
    """
    if subdivisions < 0:
        raise ValueError(f"subdivisions must be >= 0, got {subdivisions}")
    verts, faces = _icosahedron()
    for _ in range(subdivisions):
        verts, faces = _subdivide(verts, faces)
    face_uvs = _sphere_face_uvs(verts, faces)
    return (0.5 * verts).float(), faces, face_uvs.float()


def normalize_template(verts: Tensor, ellipsoid: float) -> Tensor:
    """The method's template normalisation (model-training.md §3.1).

    Per axis, min-max map to [−1, 1]. Unless ``ellipsoid == −1``, halve z and, unless also
    ``ellipsoid == 1``, divide x and z by ``ellipsoid``. Finally scale by 0.9. E.g. ellipsoid 1 gives
    x, y ∈ [−0.9, 0.9], z ∈ [−0.45, 0.45]; ellipsoid 2 gives x ∈ [−0.45, 0.45], z ∈ [−0.225, 0.225].

    The map is written as ``(v − centre)/half_range``, equal to ``2(v − min)/(max − min) − 1`` but
    exactly odd for a mirror-symmetric axis, so z-symmetry survives bit for bit.

    Args:
        verts: (V, 3) float vertices.
        ellipsoid: squash factor (the ``--ellipsoid`` flag), non-zero.

    Returns:
        (V, 3) normalised vertices, same dtype.
    """
    if ellipsoid == 0:
        raise ValueError("ellipsoid must be non-zero (-1 disables the squash, 1 only halves z)")
    low, high = verts.amin(dim=0), verts.amax(dim=0)
    if bool((high <= low).any()):
        raise ValueError(f"template is flat along an axis (min {low.tolist()}, max {high.tolist()})")
    out = (verts - (high + low) / 2) / ((high - low) / 2)
    scale = torch.ones(3, dtype=verts.dtype, device=verts.device)
    if ellipsoid != -1:
        scale[2] = 0.5
        if ellipsoid != 1:
            scale[0] /= ellipsoid
            scale[2] /= ellipsoid
    return out * scale * 0.9


def face_normals(face_verts: Tensor, unit: bool = True) -> Tensor:
    """Face normals ``(v1 − v0) × (v2 − v0)``, outward for counter-clockwise faces.

    Args:
        face_verts: (..., 3, 3) the three corners of each face.
        unit: divide by ``(|n| + 1e-10)``, so a degenerate face gives 0 instead of NaN.

    Returns:
        (..., 3) normals, same dtype.
    """
    normal = torch.linalg.cross(face_verts[..., 1, :] - face_verts[..., 0, :],
                                face_verts[..., 2, :] - face_verts[..., 0, :], dim=-1)
    if unit:
        normal = normal / (torch.linalg.vector_norm(normal, dim=-1, keepdim=True) + 1e-10)
    return normal


def gather_faces(x: Tensor, faces: Tensor) -> Tensor:
    """Per-vertex data gathered per face corner (Kaolin's ``index_vertices_by_faces``).

    Args:
        x: (B, V, D) per-vertex data.
        faces: (F, k) int64 vertex indices, shared by the batch.

    Returns:
        (B, F, k, D) with ``out[b, f, c] = x[b, faces[f, c]]``.
    """
    return x[:, faces]


def _face_edges(faces: Tensor) -> tuple[Tensor, Tensor]:
    """Unique sorted edges (E, 2) and, for each of the 3F face corners' outgoing edges, its edge id."""
    face_edges = torch.stack([faces, faces.roll(-1, dims=1)], dim=-1).reshape(-1, 2)
    return torch.unique(face_edges.sort(dim=-1).values, dim=0, return_inverse=True)


def unique_edges(faces: Tensor) -> Tensor:
    """Undirected edges of a triangle mesh.

    Args:
        faces: (F, 3) int64.

    Returns:
        (E, 2) int64 vertex pairs, each sorted ascending, rows in lexicographic order.
    """
    return _face_edges(faces)[0]


def edge_faces(faces: Tensor) -> Tensor:
    """The two faces sharing each edge of a closed manifold mesh, in :func:`unique_edges` order.

    Args:
        faces: (F, 3) int64 of a closed mesh (every edge in exactly two faces).

    Returns:
        (E, 2) int64 face indices, the smaller first.
    """
    edges, edge_id = _face_edges(faces)
    counts = torch.bincount(edge_id, minlength=len(edges))
    if bool((counts != 2).any()):
        bad = edges[counts != 2][0].tolist()
        raise ValueError(
            f"mesh is not closed and manifold: edge {bad} is in {int(counts[counts != 2][0])} faces; "
            "edge_faces needs every edge in exactly two faces"
        )
    face_of_corner = torch.arange(len(faces), device=faces.device).repeat_interleave(3)
    order = torch.sort(edge_id, stable=True).indices  # face ids stay ascending within each edge
    return face_of_corner[order].reshape(-1, 2)


def uniform_laplacian(num_verts: int, faces: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Kaolin's uniform Laplacian: ``L[i, j] = 1/deg(i)`` for neighbours j of i, ``L[i, i] = −1``.

    ``(L @ x)_i`` is the mean of i's neighbours minus x_i. Row-normalised, not symmetric. A vertex in
    no face gets a row of zeros with −1 on the diagonal.

    Args:
        num_verts: V, larger than every index in ``faces``.
        faces: (F, 3) int64.
        dtype: of the result.

    Returns:
        (V, V) dense matrix on ``faces.device``.
    """
    if faces.numel() and int(faces.max()) >= num_verts:
        raise ValueError(f"faces index vertex {int(faces.max())} but num_verts is {num_verts}")
    edges = unique_edges(faces)
    adjacency = torch.zeros(num_verts, num_verts, dtype=dtype, device=faces.device)
    adjacency[edges[:, 0], edges[:, 1]] = 1.0
    adjacency[edges[:, 1], edges[:, 0]] = 1.0
    degree = adjacency.sum(dim=1, keepdim=True)
    laplacian = adjacency / degree.clamp(min=1.0)
    laplacian.fill_diagonal_(-1.0)
    return laplacian


def flip_index(verts: Tensor) -> Tensor:
    """For each vertex, the index of the vertex nearest to its mirror image through z = 0.

    Args:
        verts: (V, 3) float.

    Returns:
        (V,) int64. An involution when the vertex set is z-symmetric; vertices on z = 0 map to
        themselves.
    """
    mirrored = verts * torch.tensor([1.0, 1.0, -1.0], dtype=verts.dtype, device=verts.device)
    return torch.cdist(mirrored, verts).argmin(dim=1)


def load_obj(path: str | Path) -> tuple[Tensor, Tensor, Tensor | None]:
    """Read a triangle mesh from a Wavefront .obj file.

    Reads ``v`` and ``vt`` lines and ``f`` lines of the forms ``v``, ``v/vt``, ``v/vt/vn`` and
    ``v//vn`` (1-based or negative indices); normals, groups and materials are ignored.

    Args:
        path: .obj file.

    Returns:
        verts (V, 3) float32, faces (F, 3) int64, face_uvs (F, 3, 2) float32 or None when the faces
        carry no texture indices.
    """
    positions, texcoords, faces, face_tex = [], [], [], []
    with open(path) as file:
        for line_no, line in enumerate(file, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if tokens[0] == "v":
                positions.append([float(t) for t in tokens[1:4]])
            elif tokens[0] == "vt":
                texcoords.append([float(t) for t in tokens[1:3]])
            elif tokens[0] == "f":
                if len(tokens) != 4:
                    raise ValueError(f"{path}:{line_no}: only triangles are supported; triangulate the mesh")
                corners = [t.split("/") for t in tokens[1:]]
                faces.append([_obj_index(c[0], len(positions)) for c in corners])
                if all(len(c) > 1 and c[1] for c in corners):
                    face_tex.append([_obj_index(c[1], len(texcoords)) for c in corners])
    if face_tex and len(face_tex) != len(faces):
        raise ValueError(f"{path}: some faces have texture indices and others do not")
    verts = torch.tensor(positions, dtype=torch.float32).reshape(-1, 3)
    faces_t = torch.tensor(faces, dtype=torch.int64).reshape(-1, 3)
    face_uvs = None
    if face_tex:
        face_uvs = torch.tensor(texcoords, dtype=torch.float32).reshape(-1, 2)[torch.tensor(face_tex)]
    return verts, faces_t, face_uvs


def _obj_index(token: str, count: int) -> int:
    """0-based index from an OBJ index token (1-based, or negative = relative to the end)."""
    index = int(token)
    return index - 1 if index > 0 else count + index


def save_obj(
    path: str | Path,
    verts: Tensor,
    faces: Tensor,
    face_uvs: Tensor | None = None,
    texture_image: Tensor | None = None,
) -> None:
    """Write a triangle mesh as a Wavefront .obj (9 significant digits: float32 round-trips exactly).

    With ``face_uvs`` the distinct UVs are written as ``vt`` and faces as ``f v/vt``. With a
    ``texture_image`` also ``<stem>.mtl`` and ``<stem>.png`` are written next to it and referenced
    from the .obj.

    Args:
        path: output .obj path.
        verts: (V, 3) float.
        faces: (F, 3) int64.
        face_uvs: optional (F, 3, 2) per-corner UVs.
        texture_image: optional (3, Ht, Wt) float RGB in [0, 1], row 0 at the top (v = 1).
    """
    path = Path(path)
    if texture_image is not None and face_uvs is None:
        raise ValueError("a texture_image needs face_uvs to map it")
    lines = []
    if texture_image is not None:
        if texture_image.ndim != 3 or texture_image.shape[0] != 3:
            raise ValueError(f"texture_image must be (3, Ht, Wt), got {tuple(texture_image.shape)}")
        _write_texture(path, texture_image)
        lines += [f"mtllib {path.stem}.mtl", "usemtl material_0"]
    lines += ["v {:.9g} {:.9g} {:.9g}".format(*p) for p in verts.detach().cpu().tolist()]
    face_list = (faces.cpu() + 1).tolist()
    if face_uvs is None:
        lines += ["f {} {} {}".format(*f) for f in face_list]
    else:
        uvs, uv_index = torch.unique(face_uvs.detach().cpu().reshape(-1, 2), dim=0, return_inverse=True)
        lines += ["vt {:.9g} {:.9g}".format(*t) for t in uvs.tolist()]
        uv_list = (uv_index.reshape(-1, 3) + 1).tolist()
        lines += [
            " ".join(["f"] + [f"{v}/{t}" for v, t in zip(f, ft, strict=True)])
            for f, ft in zip(face_list, uv_list, strict=True)
        ]
    path.write_text("\n".join(lines) + "\n")


def _write_texture(obj_path: Path, texture_image: Tensor) -> None:
    """Write ``<stem>.png`` and a one-material ``<stem>.mtl`` that uses it as the diffuse map."""
    pixels = (texture_image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(pixels.cpu().numpy())).save(obj_path.with_suffix(".png"))
    obj_path.with_suffix(".mtl").write_text(
        f"newmtl material_0\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nmap_Kd {obj_path.stem}.png\n"
    )


@dataclass
class Template:
    """Everything about the template mesh fixed at the start of training.

    The derived structures are computed once from the initial template and, as in the original,
    never recomputed when the template vertices are updated.
    """

    verts: Tensor  # (V, 3) float32, normalised template vertices (normalize_template)
    faces: Tensor  # (F, 3) int64, outward counter-clockwise
    face_uvs: Tensor  # (F, 3, 2) float32 per-corner UVs in [0, 1]
    edges: Tensor  # (E, 2) int64 unique sorted vertex pairs
    edge_faces: Tensor  # (E, 2) int64 the two faces of each edge, same order as edges
    laplacian: Tensor  # (V, V) float32 uniform Laplacian
    flip_index: Tensor  # (V,) int64 vertex nearest to the z-mirror image
    sign_init: Tensor  # (V,) float32 sign of the initial z, in {−1, 0, 1}

    @classmethod
    def from_mesh(cls, verts: Tensor, faces: Tensor, face_uvs: Tensor, ellipsoid: float = 1.0) -> "Template":
        """Normalise ``verts`` (:func:`normalize_template`) and precompute the derived structures.

        Args:
            verts: (V, 3) float; faces: (F, 3) int64 closed mesh; face_uvs: (F, 3, 2).
            ellipsoid: squash factor, see :func:`normalize_template`.
        """
        verts = normalize_template(verts.float(), ellipsoid)
        return cls(
            verts=verts,
            faces=faces,
            face_uvs=face_uvs.float(),
            edges=unique_edges(faces),
            edge_faces=edge_faces(faces),
            laplacian=uniform_laplacian(len(verts), faces),
            flip_index=flip_index(verts),
            sign_init=torch.sign(verts[:, 2]),
        )

    @classmethod
    def icosphere(cls, ellipsoid: float = 1.0, subdivisions: int = 3) -> "Template":
        """Template from :func:`icosphere` (the method's ``sphere.obj`` at 3 subdivisions)."""
        return cls.from_mesh(*icosphere(subdivisions), ellipsoid=ellipsoid)

    @classmethod
    def from_obj(cls, path: str | Path, ellipsoid: float = 1.0) -> "Template":
        """Template from a closed triangle mesh .obj with per-corner UVs (``f v/vt``); vertex order kept."""
        verts, faces, face_uvs = load_obj(path)
        if face_uvs is None:
            raise ValueError(f"{path} has no texture coordinates; a template needs 'vt' lines and 'f v/vt' faces")
        return cls.from_mesh(verts, faces, face_uvs, ellipsoid=ellipsoid)

    def to(self, device: torch.device | str) -> "Template":
        """A copy with every tensor on ``device``."""
        return Template(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
