"""Wan2.1 policy plugin for dancecore."""
