"""``distributed.sequence_parallel`` on Wan2.1: degrees that do not divide are refused naming the
key. (The 2-rank equivalence of the split network, latents, log-probs and gradients, runs in
plugins/dancecore-hunyuanvideo/tests/test_sequence_parallel.py, which checks every installed video
policy in one launch.)"""

from __future__ import annotations

import pytest
from dancecore_wan.t2v import WanT2VPolicy

from dancecore import BuildContext, ConfigError, SequenceParallelGroup


@pytest.mark.parametrize(
    ("degree", "sizes", "named"),
    [(4, {}, "attention heads"), (2, {"num_frames": 1, "height": 16, "width": 48}, "video tokens")],
)
def test_a_degree_that_does_not_divide_is_rejected_naming_the_key(degree: int, sizes: dict, named: str) -> None:
    context = BuildContext(sequence_parallel=SequenceParallelGroup(size=degree, ranks=tuple(range(degree))))
    with pytest.raises(ConfigError) as caught:
        WanT2VPolicy(WanT2VPolicy.Config(preset="tiny", **sizes), context)
    assert "distributed.sequence_parallel" in str(caught.value) and named in str(caught.value)


def test_wan_declares_sequence_parallel_support() -> None:
    assert WanT2VPolicy.supports_sequence_parallel is True
