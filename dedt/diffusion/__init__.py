"""Diffusion models: presets (diffusers UNet2DModel), training with exact resume, sampling.

Import the submodules (``dedt.diffusion.train`` etc.); this package imports nothing heavy itself, so
``import dedt`` stays cheap.
"""
