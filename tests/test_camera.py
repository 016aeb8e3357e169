"""Camera math against the hand-computed values of spec/renderer-math.md §1 and T1, plus round trips."""

import math

import pytest
import torch

from renderer.camera import (
    FOVY_RAD,
    camera_position,
    camera_to_world,
    camera_transform,
    look_at,
    perspective_projection,
    project,
    unproject,
    world_to_camera,
)
from renderer.mesh import face_normals

F64 = torch.float64


def _t(values):
    return torch.tensor(values, dtype=F64)


def test_perspective_projection_values():
    assert math.tan(FOVY_RAD / 2) == pytest.approx(0.4)
    torch.testing.assert_close(perspective_projection(FOVY_RAD, 1.0, F64), _t([2.5, 2.5, -1.0]))
    torch.testing.assert_close(perspective_projection(math.pi / 4, 1.0, F64), _t([2.4142136, 2.4142136, -1.0]))
    torch.testing.assert_close(perspective_projection(math.pi / 4, 2.0, F64), _t([1.2071068, 2.4142136, -1.0]))
    assert perspective_projection(FOVY_RAD, 0.5).dtype == torch.float32


@pytest.mark.parametrize(("fovy", "aspect"), [(0.0, 1.0), (math.pi, 1.0), (1.0, 0.0), (1.0, -2.0)])
def test_perspective_projection_rejects_bad_input(fovy, aspect):
    with pytest.raises(ValueError):
        perspective_projection(fovy, aspect)


def test_camera_position_axes():
    d = _t([2.0, 2.0, 2.0])
    pos = camera_position(d, _t([0.0, 0.0, 90.0]), _t([0.0, 90.0, 0.0]))
    torch.testing.assert_close(pos, _t([[0.0, 0.0, 2.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))


def test_camera_on_z_axis_projects_t1_points():
    transform = look_at(_t([[0.0, 0.0, 3.0]]), _t([[0.0, 0.0, 0.0]]))
    expected = _t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -3.0]])
    torch.testing.assert_close(transform, expected[None])
    cam = world_to_camera(_t([[[0.5, 0.25, 0.0], [0.0, 1.0, 0.0]]]), transform)
    torch.testing.assert_close(cam[0, 0], _t([0.5, 0.25, -3.0]))
    ndc = project(cam, perspective_projection(FOVY_RAD, 1.0, F64))
    torch.testing.assert_close(ndc, _t([[[5 / 12, 5 / 24], [0.0, 5 / 6]]]))


def test_camera_transform_30_45_example():
    transform = camera_transform(_t([45.0]), _t([30.0]), _t([3.0]), torch.zeros(1, 2, dtype=F64))
    expected = _t([[0.707107, -0.353553, 0.612372], [0.0, 0.866025, 0.5],
                   [-0.707107, -0.353553, 0.612372], [0.0, 0.0, -3.0]])
    torch.testing.assert_close(transform, expected[None], atol=1e-6, rtol=0)
    torch.testing.assert_close(camera_position(_t([3.0]), _t([30.0]), _t([45.0])), _t([[1.837117, 1.5, 1.837117]]),
                               atol=1e-6, rtol=0)
    cam = world_to_camera(_t([[[0.5, 0.25, 0.0]]]), transform)
    torch.testing.assert_close(cam, _t([[[0.353553, 0.039730, -2.568814]]]), atol=1e-6, rtol=0)
    ndc = project(cam, perspective_projection(FOVY_RAD, 1.0, F64))
    torch.testing.assert_close(ndc, _t([[[0.344082, 0.038665]]]), atol=1e-6, rtol=0)


def test_offset_point_is_the_image_centre():
    offset = _t([[0.2, -0.1], [-0.3, 0.25]])
    eye = camera_position(_t([2.5, 4.0]), _t([10.0, -20.0]), _t([-30.0, 120.0]))
    transform = camera_transform(_t([-30.0, 120.0]), _t([10.0, -20.0]), _t([2.5, 4.0]), offset)
    at = torch.cat([offset, torch.zeros(2, 1, dtype=F64)], dim=1)
    cam = world_to_camera(at[:, None], transform)[:, 0]
    torch.testing.assert_close(cam[:, :2], torch.zeros(2, 2, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(cam[:, 2], -torch.linalg.vector_norm(eye - at, dim=1))


def test_camera_transform_rejects_bad_offset():
    with pytest.raises(ValueError, match="offset"):
        camera_transform(_t([0.0]), _t([0.0]), _t([3.0]), torch.zeros(1, 3, dtype=F64))


def test_back_faces_have_negative_camera_normal_z():
    transform = look_at(_t([[0.0, 0.0, 3.0]]), _t([[0.0, 0.0, 0.0]]))
    triangle = world_to_camera(_t([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]), transform)[0]
    torch.testing.assert_close(face_normals(triangle), _t([0.0, 0.0, 1.0]))
    torch.testing.assert_close(face_normals(triangle[[0, 2, 1]]), _t([0.0, 0.0, -1.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trips(dtype):
    generator = torch.Generator().manual_seed(0)
    batch = 4
    azimuth = torch.rand(batch, generator=generator, dtype=dtype) * 360 - 180
    elevation = torch.rand(batch, generator=generator, dtype=dtype) * 120 - 60
    distance = torch.rand(batch, generator=generator, dtype=dtype) * 3 + 2
    offset = torch.rand(batch, 2, generator=generator, dtype=dtype) * 0.4 - 0.2
    verts = torch.rand(batch, 50, 3, generator=generator, dtype=dtype) - 0.5
    transform = camera_transform(azimuth, elevation, distance, offset)
    assert transform.dtype == dtype

    rotation = transform[:, :3]
    eye = torch.eye(3, dtype=dtype).expand(batch, 3, 3)
    torch.testing.assert_close(rotation.transpose(1, 2) @ rotation, eye)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(batch, dtype=dtype))

    cam = world_to_camera(verts, transform)
    assert bool((cam[..., 2] < 0).all())
    torch.testing.assert_close(camera_to_world(cam, transform), verts)
    proj = perspective_projection(FOVY_RAD, 96 / 160, dtype)
    torch.testing.assert_close(unproject(project(cam, proj), cam[..., 2], proj), cam)
