"""Mesh utilities: icosphere topology and UVs, normalisation, normals, edges, Laplacian, flip index, .obj I/O."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from renderer.mesh import (
    Template,
    edge_faces,
    face_normals,
    flip_index,
    gather_faces,
    icosphere,
    load_obj,
    normalize_template,
    save_obj,
    uniform_laplacian,
    unique_edges,
)

TETRAHEDRON = torch.tensor([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])


@pytest.fixture(scope="module")
def sphere():
    return icosphere(3)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_icosphere_counts(level):
    verts, faces, face_uvs = icosphere(level)
    num_verts, num_faces, num_edges = 10 * 4**level + 2, 20 * 4**level, 30 * 4**level
    assert verts.shape == (num_verts, 3) and verts.dtype == torch.float32
    assert faces.shape == (num_faces, 3) and faces.dtype == torch.int64
    assert face_uvs.shape == (num_faces, 3, 2)
    assert unique_edges(faces).shape == (num_edges, 2)
    assert int((verts[:, 2] == 0).sum()) == 4 * 2**level


def test_icosphere_level3_geometry(sphere):
    verts, faces, _ = sphere
    assert (len(verts), len(faces), len(unique_edges(faces))) == (642, 1280, 1920)
    degree = torch.bincount(unique_edges(faces).flatten())
    assert torch.bincount(degree).tolist() == [0, 0, 0, 0, 0, 12, 630]
    torch.testing.assert_close(torch.linalg.vector_norm(verts, dim=1), torch.full((642,), 0.5))
    normals = face_normals(verts[faces])
    centroids = verts[faces].mean(dim=1)
    # Outward counter-clockwise: every unit normal nearly parallel to its centroid direction.
    cosine = (normals * centroids).sum(-1) / torch.linalg.vector_norm(centroids, dim=-1)
    assert float(cosine.min()) > 0.99


def test_icosphere_mirror_symmetry_is_exact(sphere):
    verts = sphere[0]
    flip = flip_index(verts)
    identity = torch.arange(len(verts))
    torch.testing.assert_close(flip[flip], identity)
    assert torch.equal(verts[flip], verts * torch.tensor([1.0, 1.0, -1.0]))
    fixed = flip == identity
    assert int(fixed.sum()) == 32
    assert bool((verts[fixed, 2] == 0).all())


def test_icosphere_uv_layout(sphere):
    verts, faces, face_uvs = sphere
    assert float(face_uvs.min()) >= 0.0 and float(face_uvs.max()) <= 1.0
    n = verts / 0.5
    torch.testing.assert_close(face_uvs[..., 0], (0.5 + torch.asin(n[:, 0].clamp(-1, 1)) / math.pi)[faces])
    # No face spans the texture: the seam and pole fixes keep every face compact in uv.
    spans = face_uvs.amax(dim=1) - face_uvs.amin(dim=1)
    assert float(spans.max()) < 0.2

    def uv_of(direction):
        index = int(torch.cdist(torch.tensor([direction]) * 0.5, verts).argmin())
        return face_uvs[faces == index]

    # v = 0.25 front (+z), 0.5 top (+y), 0.75 back (-z); u = 0.5 off the x axis, 0 / 1 at -x / +x.
    for direction, (u, v) in [((0, 0, 1), (0.5, 0.25)), ((0, 1, 0), (0.5, 0.5)), ((0, 0, -1), (0.5, 0.75))]:
        torch.testing.assert_close(uv_of(direction), torch.tensor([u, v]).expand(6, 2))
    assert bool((uv_of((1, 0, 0))[:, 0] == 1).all()) and bool((uv_of((-1, 0, 0))[:, 0] == 0).all())
    # Off the seam (z = 0, y < 0) and the poles (x = +-1): faces strictly in front, behind or on top.
    corners = n[faces]
    away_from_seam = ((corners[..., 2] > 0).all(1) | (corners[..., 2] < 0).all(1) | (corners[..., 1] > 0).all(1))
    v_formula = torch.remainder(torch.atan2(n[:, 2], -n[:, 1]), 2 * math.pi) / (2 * math.pi)
    torch.testing.assert_close(face_uvs[away_from_seam][..., 1], v_formula[faces][away_from_seam])


def test_icosphere_uvs_mirror_to_one_minus_v(sphere):
    verts, faces, face_uvs = sphere
    flip = flip_index(verts)
    face_of = {tuple(sorted(f)): i for i, f in enumerate(faces.tolist())}
    mirror_face = torch.tensor([face_of[tuple(sorted(flip[f].tolist()))] for f in faces])
    # Faces crossing the seam (their own mirror image, below the equator) get snapped corners.
    crossing = (mirror_face == torch.arange(len(faces))) & (verts[faces][..., 1].mean(dim=1) < 0)
    assert int(crossing.sum()) == 16
    for f in torch.nonzero(~crossing).flatten().tolist():
        g = int(mirror_face[f])
        corner_in_g = [faces[g].tolist().index(int(flip[v])) for v in faces[f]]
        torch.testing.assert_close(face_uvs[g, corner_in_g, 0], face_uvs[f, :, 0])
        torch.testing.assert_close(face_uvs[g, corner_in_g, 1], 1 - face_uvs[f, :, 1])


def test_normalize_template_hand_example():
    verts = torch.tensor([[0.0, 0.0, 0.0], [2.0, 4.0, 8.0], [1.0, 1.0, 6.0]])
    expected_unit = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.0, -0.5, 0.5]])
    torch.testing.assert_close(normalize_template(verts, -1), 0.9 * expected_unit)
    torch.testing.assert_close(normalize_template(verts, 1), 0.9 * expected_unit * torch.tensor([1, 1, 0.5]))
    torch.testing.assert_close(normalize_template(verts, 2), 0.9 * expected_unit * torch.tensor([0.5, 1, 0.25]))


def test_normalize_template_rejects_bad_input():
    with pytest.raises(ValueError, match="ellipsoid"):
        normalize_template(torch.rand(5, 3), 0)
    with pytest.raises(ValueError, match="flat"):
        normalize_template(torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]), 1)


def test_face_normals():
    tri = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(face_normals(tri), torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(face_normals(2 * tri, unit=False), torch.tensor([0.0, 0.0, 4.0]))
    degenerate = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    assert torch.equal(face_normals(degenerate), torch.zeros(3, dtype=torch.float64))


def test_gather_faces():
    x = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    out = gather_faces(x, TETRAHEDRON)
    assert out.shape == (2, 4, 3, 2)
    torch.testing.assert_close(out[1, 2, 1], x[1, 2])
    torch.testing.assert_close(out[0, 3, 2], x[0, 2])


def test_unique_edges_and_edge_faces_tetrahedron():
    assert unique_edges(TETRAHEDRON).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert edge_faces(TETRAHEDRON).tolist() == [[0, 1], [0, 3], [1, 3], [0, 2], [1, 2], [2, 3]]


def test_edge_faces_consistency(sphere):
    faces = sphere[1]
    edges, pairs = unique_edges(faces), edge_faces(faces)
    assert pairs.shape == (1920, 2)
    assert bool((pairs[:, 0] < pairs[:, 1]).all())
    for side in range(2):
        corners = faces[pairs[:, side]]  # (E, 3)
        for end in range(2):
            assert bool((corners == edges[:, end : end + 1]).any(dim=1).all())


def test_edge_faces_rejects_open_mesh():
    with pytest.raises(ValueError, match="closed"):
        edge_faces(TETRAHEDRON[:3])


def test_uniform_laplacian_hand_examples():
    triangle = uniform_laplacian(3, torch.tensor([[0, 1, 2]]))
    torch.testing.assert_close(triangle, torch.tensor([[-1.0, 0.5, 0.5], [0.5, -1.0, 0.5], [0.5, 0.5, -1.0]]))
    tetra = uniform_laplacian(4, TETRAHEDRON, dtype=torch.float64)
    expected = torch.full((4, 4), 1 / 3, dtype=torch.float64).fill_diagonal_(-1.0)
    torch.testing.assert_close(tetra, expected)
    # Vertex 3 is in no face: a zero row with -1 on the diagonal, not NaN.
    isolated = uniform_laplacian(4, torch.tensor([[0, 1, 2]]))
    torch.testing.assert_close(isolated[3], torch.tensor([0.0, 0.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="num_verts"):
        uniform_laplacian(2, torch.tensor([[0, 1, 2]]))


def test_uniform_laplacian_icosphere(sphere):
    verts, faces, _ = sphere
    laplacian = uniform_laplacian(len(verts), faces)
    torch.testing.assert_close(laplacian.sum(dim=1), torch.zeros(642), atol=1e-6, rtol=0)
    torch.testing.assert_close(laplacian @ torch.full((642, 3), 2.5), torch.zeros(642, 3), atol=1e-5, rtol=0)
    edges = unique_edges(faces)
    neighbours = torch.cat([edges[edges[:, 0] == 7, 1], edges[edges[:, 1] == 7, 0]])
    torch.testing.assert_close((laplacian @ verts)[7], verts[neighbours].mean(dim=0) - verts[7])


def test_obj_round_trip_with_uvs_and_texture(tmp_path, sphere):
    verts, faces, face_uvs = sphere
    texture = torch.linspace(0, 1, 3 * 4 * 5).reshape(3, 4, 5)
    path = tmp_path / "sphere.obj"
    save_obj(path, verts, faces, face_uvs, texture_image=texture)
    loaded_verts, loaded_faces, loaded_uvs = load_obj(path)
    torch.testing.assert_close(loaded_verts, verts, atol=1e-6, rtol=0)
    assert torch.equal(loaded_faces, faces)
    torch.testing.assert_close(loaded_uvs, face_uvs, atol=1e-6, rtol=0)
    assert "map_Kd sphere.png" in (tmp_path / "sphere.mtl").read_text()
    assert path.read_text().startswith("mtllib sphere.mtl")
    pixels = np.asarray(Image.open(tmp_path / "sphere.png"))
    assert pixels.shape == (4, 5, 3)
    np.testing.assert_array_equal(pixels, (texture.permute(1, 2, 0) * 255).round().numpy().astype(np.uint8))


def test_obj_without_uvs_and_other_face_forms(tmp_path):
    path = tmp_path / "tetra.obj"
    verts = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    save_obj(path, verts, TETRAHEDRON)
    loaded_verts, loaded_faces, loaded_uvs = load_obj(path)
    assert loaded_uvs is None and torch.equal(loaded_faces, TETRAHEDRON)
    torch.testing.assert_close(loaded_verts, verts)

    header = "o thing\nv 0 0 0\nv 1 0 0\nv 0 1 0\nvn 0 0 1\nvt 0 0\nvt 1 0\nvt 0 1\n"
    path.write_text(header + "f 1//1 2//1 3//1\n")
    _, faces, uvs = load_obj(path)
    assert faces.tolist() == [[0, 1, 2]] and uvs is None
    path.write_text(header + "f -3/-1/1 -2/-2/1 -1/-3/1\n")  # negative = relative to the end
    _, faces, uvs = load_obj(path)
    assert faces.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(uvs, torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]]))
    path.write_text(header + "f 1//1 2//1 3//1\nf 1/1 2/2 3/3\n")
    with pytest.raises(ValueError, match="texture indices"):
        load_obj(path)

    path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 1 1 0\nf 1 2 4 3\n")
    with pytest.raises(ValueError, match="triangles"):
        load_obj(path)


def test_obj_rejects_texture_without_uvs(tmp_path):
    with pytest.raises(ValueError, match="face_uvs"):
        save_obj(tmp_path / "x.obj", torch.rand(4, 3), TETRAHEDRON, texture_image=torch.rand(3, 2, 2))


def test_template_icosphere():
    template = Template.icosphere(ellipsoid=1.0)
    torch.testing.assert_close(template.verts.amax(dim=0), torch.tensor([0.9, 0.9, 0.45]))
    torch.testing.assert_close(template.verts.amin(dim=0), torch.tensor([-0.9, -0.9, -0.45]))
    assert template.edges.shape == (1920, 2) and template.edge_faces.shape == (1920, 2)
    assert template.laplacian.shape == (642, 642) and template.laplacian.dtype == torch.float32
    assert torch.bincount((template.sign_init + 1).long()).tolist() == [305, 32, 305]
    flip = template.flip_index
    torch.testing.assert_close(flip[flip], torch.arange(642))
    torch.testing.assert_close(template.sign_init[flip], -template.sign_init)
    market = Template.icosphere(ellipsoid=2.0)
    torch.testing.assert_close(market.verts.amax(dim=0), torch.tensor([0.45, 0.9, 0.225]))


def test_template_from_obj_matches_icosphere(tmp_path, sphere):
    path = tmp_path / "sphere.obj"
    save_obj(path, *sphere)
    from_file, direct = Template.from_obj(path, ellipsoid=2.0), Template.icosphere(ellipsoid=2.0)
    torch.testing.assert_close(from_file.verts, direct.verts)
    for name in ("faces", "edges", "edge_faces", "flip_index"):
        assert torch.equal(getattr(from_file, name), getattr(direct, name)), name
    moved = from_file.to("cpu")
    assert moved is not from_file and torch.equal(moved.laplacian, direct.laplacian)

    save_obj(path, sphere[0], sphere[1])
    with pytest.raises(ValueError, match="texture coordinates"):
        Template.from_obj(path)
