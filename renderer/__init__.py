"""Differentiable DIB-R mesh renderer (Kaolin v0.12 semantics) in plain PyTorch, with a Triton CUDA path."""

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
from renderer.rasterize import Rasterized, rasterize, rasterize_reference
from renderer.render import RenderOutput, render
from renderer.shading import mask_iou, mask_iou_loss, sample_texture, sh_basis, sh_lighting

__all__ = [
    "FOVY_RAD", "camera_position", "camera_to_world", "camera_transform", "look_at", "perspective_projection",
    "project", "unproject", "world_to_camera",
    "Template", "edge_faces", "face_normals", "flip_index", "gather_faces", "icosphere", "load_obj",
    "normalize_template", "save_obj", "uniform_laplacian", "unique_edges",
    "Rasterized", "rasterize", "rasterize_reference", "RenderOutput", "render",
    "mask_iou", "mask_iou_loss", "sample_texture", "sh_basis", "sh_lighting",
]
