"""GenEval (Ghosh et al., 2023) for dancecore, on transformers instead of mmdetection."""
