"""Stable Diffusion 3.5 policy plugin for dancecore."""
