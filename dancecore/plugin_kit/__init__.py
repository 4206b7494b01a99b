"""Helpers plugins share: network options and LoRA, weight resolution (offline), tiny presets,
pixel checks. Plugins reach them through ``import dancecore``.

May import: :mod:`dancecore.contracts`, :mod:`dancecore.errors`.
"""
