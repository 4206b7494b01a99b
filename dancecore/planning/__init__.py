"""``dancecore plan``: per-GPU memory of a run at its real sizes, before any weights are loaded.

:mod:`~dancecore.planning.measure` measures activations by running the policy's real networks on
the meta device; :mod:`~dancecore.planning.states` holds the ZeRO accounting of weights, gradients
and optimizer states; :mod:`~dancecore.planning.plan` puts them together for a config and says
which settings fit. See docs/distributed.md, "Memory planning".
"""
