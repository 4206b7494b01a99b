"""Running a training job: the trainer (components, one iteration), the sampling shared with
``dancecore eval``, the training-state record, the run loop, the engine, scoring, prompts and the
LR schedule.

May import: contracts, functional, plugin_kit, config, checkpoint, outputs, registry, hooks, errors.
Never imports deepspeed (that is :mod:`dancecore.distributed`, which plugs an engine in here).
"""
