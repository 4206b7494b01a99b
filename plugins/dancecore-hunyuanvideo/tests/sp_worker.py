"""One rank of the sequence-parallel equivalence check (started by torchrun, 2 ranks, gloo).

Every tiny video policy installed (HunyuanVideo, SkyReels I2V, Wan2.1) split over the 2 ranks
against the same policy whole (``dancecore.testing.sequence_parallel_differences``); rank 0
writes the measured differences to JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from dancecore import Prompt, PromptBatch, SequenceParallelGroup
from dancecore.testing import sequence_parallel_differences


def _policies(image: str) -> list[tuple[str, Any, dict[str, Any], PromptBatch]]:
    from dancecore_hunyuanvideo.skyreels_i2v import SkyReelsI2VPolicy
    from dancecore_hunyuanvideo.t2v import HunyuanVideoPolicy

    texts = PromptBatch((Prompt("a red cube", 0), Prompt("a cat on a mat", 1)))
    images = PromptBatch((Prompt("a red cube", 0, image), Prompt("a cat on a mat", 1, image)))
    found = [
        ("hunyuanvideo", HunyuanVideoPolicy, {"preset": "tiny"}, texts),
        ("skyreels-i2v", SkyReelsI2VPolicy, {"preset": "tiny", "cfg_scale": 3.0}, images),
    ]
    try:
        from dancecore_wan.t2v import WanT2VPolicy
    except ImportError:  # the Wan plugin is not installed: check the others
        return found
    return [*found, ("wan-t2v", WanT2VPolicy, {"preset": "tiny"}, texts)]


def main(out_path: str, image: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sp = SequenceParallelGroup(size=world, rank=rank, group=torch.distributed.new_group(), ranks=tuple(range(world)))
    results = {
        name: sequence_parallel_differences(cls, options, prompts, sp)
        for name, cls, options, prompts in _policies(image)
    }
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
