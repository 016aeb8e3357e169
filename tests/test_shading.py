"""Texture lookup, SH lighting and mask IoU against the tables of spec/renderer-math.md §4 (T7)."""

import pytest
import torch

from renderer.shading import mask_iou, mask_iou_loss, sample_texture, sh_basis, sh_lighting

# (uv, value) for the 2x2 texture with rows top -> bottom [[1, 2], [3, 4]] (spec §4.1).
TEXTURE_TABLE = [
    ((0.0, 0.0), 3.0),
    ((0.25, 0.75), 1.0),
    ((0.5, 0.5), 2.5),
    ((0.75, 0.25), 4.0),
    ((1.0, 1.0), 2.0),
    ((0.5, 1.0), 1.5),
    ((-0.3, 1.7), 1.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_texture_table(dtype):
    texture = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype).expand(1, 1, 2, 2)
    uv = torch.tensor([uv for uv, _ in TEXTURE_TABLE], dtype=dtype).view(1, 1, -1, 2)
    out = sample_texture(uv, texture)
    assert out.shape == (1, 1, len(TEXTURE_TABLE), 1) and out.dtype == dtype
    torch.testing.assert_close(out.flatten(), torch.tensor([v for _, v in TEXTURE_TABLE], dtype=dtype))


def test_sample_texture_gradients():
    texture = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, 3, 2, 2).clone().requires_grad_()
    uv = torch.tensor([[[[0.4, 0.6], [1.3, 0.5]]]], requires_grad=True)
    sample_texture(uv, texture).sum().backward()
    # Inside: the texture varies with u (+1 per texel) and v (-2 per texel: v up, rows down).
    torch.testing.assert_close(uv.grad[0, 0, 0], torch.tensor([3 * 2.0, 3 * -4.0]))
    # Outside [0, 1] the clamp stops the gradient of that coordinate.
    assert uv.grad[0, 0, 1, 0] == 0
    torch.testing.assert_close(texture.grad.sum(), torch.tensor(6.0))


def test_sample_texture_rejects_bad_shapes():
    with pytest.raises(ValueError, match="uv"):
        sample_texture(torch.rand(1, 4, 2), torch.rand(1, 3, 2, 2))
    with pytest.raises(ValueError, match="texture"):
        sample_texture(torch.rand(2, 4, 4, 2), torch.rand(1, 3, 2, 2))


def test_sh_basis_rows():
    up_z = sh_basis(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(
        up_z, torch.tensor([0.282095, 0, 0.488603, 0, 0, 0, 0.630783, 0, 0], dtype=torch.float64),
        atol=1e-6, rtol=0,
    )
    x, y, z = 0.3, -0.4, 0.5
    expected = [0.28209479177, 0.4886025119 * x, 0.4886025119 * z, 0.4886025119 * y,
                1.09254843059 * x * y, 1.09254843059 * y * z, 0.94617469575 * z * z - 0.31539156525,
                0.77254840404 * x * z, 0.38627420202 * (x * x - y * y)]
    torch.testing.assert_close(sh_basis(torch.tensor([x, y, z], dtype=torch.float64)),
                               torch.tensor(expected, dtype=torch.float64))


def test_sh_lighting_background_and_batch():
    light = torch.tensor([[0.7, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [2.0, 0, 0, 0, 0, 0, -1.0, 0, 0]])
    normals = torch.zeros(2, 3, 4, 3)
    normals[1, 0, 0] = torch.tensor([0.0, 0.0, 1.0])
    coef = sh_lighting(normals, light)
    assert coef.shape == (2, 3, 4)
    torch.testing.assert_close(coef[0], torch.full((3, 4), 0.28209479 * 0.7 - 0.31539157 * 0.6))
    torch.testing.assert_close(coef[1, 0, 0], torch.tensor(2 * 0.28209479 - 0.63078313))
    torch.testing.assert_close(coef[1, 1, 1], torch.tensor(2 * 0.28209479 + 0.31539157))
    with pytest.raises(ValueError, match="light"):
        sh_lighting(normals, light[:, :4])


def test_mask_iou_example():
    pred = torch.tensor([[[1.0, 0.5]], [[0.0, 0.25]]])
    target = torch.tensor([[[1.0, 1.0]], [[0.0, 1.0]]])
    # Sample 0: intersection 1.5, union 2 -> 0.75; sample 1: 0.25 / 1.
    torch.testing.assert_close(mask_iou(pred, target), torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(mask_iou_loss(pred[:1], target[:1]), torch.tensor(0.25))
    torch.testing.assert_close(mask_iou_loss(pred, target), torch.tensor(0.5))
    empty = torch.zeros(1, 2, 2)
    assert mask_iou(empty, empty).item() == 0.0
    with pytest.raises(ValueError, match="shape"):
        mask_iou(pred, target[:, :, :1])
