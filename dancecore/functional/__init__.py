"""The math as small pure functions: SDE/ODE steps and their log-probabilities, GRPO advantages and
the clipped loss, seeded generators.

May import: torch only (no I/O, no config, no other dancecore package). Tested against hand computations.
"""
