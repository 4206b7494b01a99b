"""Checkpoints: atomic, verified directories (staging, manifest with hashes, commit by rename),
reading with verification, RNG states, and the resume plan.

May import: errors, functional. Knows nothing of the trainer: it stores what the training-state record gives it.
"""

from dancecore.checkpoint.reading import (
    committed_checkpoints,
    find_latest,
    plan_resume,
    read_checkpoint,
    verify,
)
from dancecore.checkpoint.state import (
    IMPLEMENTATION_KEYS,
    flatten_optimizer_state,
    portable_param_group,
    restore_check_disabled,
    restore_rng_state,
    rng_state,
    skipped_restores,
    state_differences,
    tensors_equal,
    unflatten_optimizer_state,
)
from dancecore.checkpoint.store import (
    FORMAT_VERSION,
    MANIFEST,
    PICKLE_SUFFIXES,
    RESTORABLE_PIECES,
    STATE,
    Checkpoint,
    CheckpointError,
    CheckpointWriteError,
    ResumePlan,
    abort,
    begin,
    checkpoint_dir,
    commit,
    committed_path,
    ensure_inside,
    rank_file,
    rotate,
    staging_path,
    write_checkpoint,
    write_json,
    write_manifest,
    write_tensors,
)

__all__ = [
    "FORMAT_VERSION", "IMPLEMENTATION_KEYS", "MANIFEST", "PICKLE_SUFFIXES", "RESTORABLE_PIECES", "STATE",
    "Checkpoint", "CheckpointError", "CheckpointWriteError", "ResumePlan", "abort", "begin", "checkpoint_dir",
    "commit", "committed_checkpoints", "committed_path", "ensure_inside", "find_latest", "flatten_optimizer_state",
    "plan_resume", "portable_param_group", "rank_file", "read_checkpoint", "restore_check_disabled",
    "restore_rng_state", "rng_state", "rotate", "skipped_restores", "staging_path", "state_differences",
    "tensors_equal", "unflatten_optimizer_state", "verify", "write_checkpoint", "write_json", "write_manifest",
    "write_tensors",
]
