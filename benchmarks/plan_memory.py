"""``dancecore plan`` against the measured peak memory of real CPU steps.

    python -m benchmarks.plan_memory              # tiny FLUX and SD presets, a medium FLUX
    python -m benchmarks.plan_memory --only medium-flux

For each configuration the planner's figure (its one-process fp32 setting: 16 B per parameter of
weights, gradients and AdamW moments, plus the activation peak measured on the meta device) is
compared with a real run of the same network on the CPU, in a fresh process: two AdamW steps of two
micro-batches, peak resident set (``VmHWM``, reset first) minus the resident set before the weights are
allocated (method ``rss``), and the peak of live tensor bytes counted around the real kernels
(method ``tensors``: no allocator or library overhead, so it resolves the tiny presets, whose few
megabytes sit below the RSS reading's fixed overhead); :mod:`dancecore.planning.verify` has the
details. Rollout: two no-grad forwards. The ratios are printed and written to ``benchmarks/results/plan_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import machine
from dancecore.planning.verify import compare

RESULTS = Path(__file__).parent / "results" / "plan_memory.json"


def _medium_flux(root: Path) -> dict[str, Any]:
    """A FLUX transformer of 2 double- and 4 single-stream blocks at width 768 (6 x 128 heads),
    about 0.1 B parameters, read from a diffusers-layout directory of config.json files."""
    from dancecore_flux.policy import TINY_SPEC

    transformer = {**TINY_SPEC["transformer"], "in_channels": 64, "num_layers": 2, "num_single_layers": 4}
    transformer |= {"attention_head_dim": 128, "num_attention_heads": 6, "joint_attention_dim": 768}
    transformer |= {"pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}
    parts = {"transformer": transformer, "vae": {**TINY_SPEC["vae"], "block_out_channels": [8, 16, 16, 16]}}
    parts["vae"] |= {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    parts |= {"text_encoder": TINY_SPEC["clip"], "text_encoder_2": TINY_SPEC["t5"]}
    for name, config in parts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(config))
    return {"pretrained": str(root), "resolution": 256, "max_sequence_length": 64}


def cases(root: Path) -> dict[str, tuple[str, dict[str, Any], int]]:
    """name -> (policy, options, micro-batch rows)."""
    return {
        "tiny-flux": ("flux", {"preset": "tiny", "resolution": 64}, 2),
        "tiny-sd": ("sd", {"preset": "tiny", "resolution": 64}, 2),
        "medium-flux": ("flux", _medium_flux(root / "medium-flux"), 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the comparisons, print them, write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=None, help="one case: tiny-flux, tiny-sd or medium-flux")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (policy, options, micro_batch) in cases(Path(tmp)).items():
            if args.only and name != args.only:
                continue
            for method in ("tensors", "rss"):
                start = time.perf_counter()
                for a in compare(policy, options, micro_batch, method=method):
                    rows.append({"case": name, "method": method, "phase": a.phase, "planned_mb": a.planned / 1e6,
                                 "measured_mb": a.measured / 1e6, "ratio": round(a.ratio, 3)})  # fmt: skip
                    print(f"{name:12s} {method:8s} {a.phase:9s} planned {a.planned / 1e6:9.1f} MB  "
                          f"measured {a.measured / 1e6:9.1f} MB  planned/measured {a.ratio:.3f}")  # fmt: skip
                print(f"  ({time.perf_counter() - start:.0f} s)")
    if not args.only:
        RESULTS.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
