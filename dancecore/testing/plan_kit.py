"""Test helpers for a policy's ``memory_plan_spec`` (``dancecore plan``)::

from dancecore.testing import check_memory_plan

def test_plan_matches_a_real_cpu_run():
    check_memory_plan("my-policy", {"preset": "tiny"})
"""

from __future__ import annotations

from typing import Any

from dancecore.planning.measure import ActivationFigures, measure_call
from dancecore.planning.verify import Agreement, compare


def check_memory_plan(policy: str, options: dict[str, Any], rows: int = 2, tolerance: float = 0.15) -> list[Agreement]:
    """Run the policy's trained network for real on the CPU (two AdamW steps of two micro-batches
    of ``rows``, fp32, and two no-grad forwards), count its live tensor bytes, and assert that the
    planner's rollout and training figures are within ``tolerance`` of them."""
    agreements = compare(policy, options, rows, method="tensors")
    for agreement in agreements:
        if abs(agreement.ratio - 1.0) > tolerance:
            raise AssertionError(
                f"{policy}: the planner's {agreement.phase} figure {agreement.planned:,} B is "
                f"{agreement.ratio:.3f} x the measured {agreement.measured:,} B (tolerance {tolerance:.0%})"
            )
    return agreements


def plan_activations(spec: Any, rows: int) -> ActivationFigures:
    """The activation figures ``dancecore plan`` measures for ``spec`` (a ``MemoryPlanSpec``)."""
    return measure_call(spec.trained, spec.call, rows)
