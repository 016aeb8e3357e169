"""Differentiable DIB-R mesh renderer (Kaolin v0.12 semantics) in plain PyTorch, with a Triton CUDA path.

Import from the modules: `renderer.camera`, `renderer.mesh`, `renderer.rasterize` (the one entry point,
`rasterize`), `renderer.shading` and `renderer.render` (`render`: attributes -> RGB + soft mask).
"""
