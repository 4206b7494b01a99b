"""dancecore-shapes: a tiny synthetic world of coloured circles, squares and triangles.

``scenes`` (specs, captions, renderer), ``prompts`` (the train/held-out prompt split),
``evaluator`` (exact GenEval-style verdicts from pixels), ``reward`` (the ``shapes`` reward) and
``geneval`` (per-task accuracy tables).
"""

__version__ = "0.1.0"
