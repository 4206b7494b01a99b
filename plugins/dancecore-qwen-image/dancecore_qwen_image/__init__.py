"""Qwen-Image policy plugin for dancecore."""
