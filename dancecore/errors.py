"""The one error hierarchy of dancecore; the exit code a CLI command returns is encoded in the class.

- :class:`UserError` (exit code 2): the input is wrong, nothing ran or nothing was lost — a config
  key, a plugin, a prompt file, model weights, the output directory, a checkpoint to resume from.
- :class:`RunError` (exit code 1): a run that had started failed — training diverged, a reward
  failed under the ``fail`` policy, a checkpoint could not be written, replicas diverged.

Plugins raise their own subclasses of these (``class MyRewardError(dancecore.RunError)``) so the
CLI reports them with the right code and one clear line.
"""

from __future__ import annotations


class DancecoreError(Exception):
    """Base of every error dancecore raises on purpose; ``exit_code`` is what the CLI returns."""

    exit_code: int = 1


class UserError(DancecoreError):
    """Bad input: the message names the key, file, plugin or URL to fix. Exit code 2."""

    exit_code = 2


class RunError(DancecoreError):
    """A started run failed; finished work is checkpointed where possible. Exit code 1."""

    exit_code = 1


# ----------------------------------------------------------------------------------- user errors


class ConfigError(UserError):
    """One or more problems with a run configuration; ``errors`` holds one message per problem."""

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(errors))


class PluginError(UserError):
    """A plugin is unknown, blocked, fails to import, or does not honour its contract."""


class PromptFileError(UserError, ValueError):
    """A prompt file is missing, unreadable, empty or malformed."""


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Model weights are neither a local directory, a plugin's shipped weights, nor in the Hugging Face cache."""


class OutputDirError(UserError):
    """The output directory cannot be created or written, or already holds another run."""


class CheckpointError(UserError):
    """A checkpoint to read is missing, invalid or does not match the run (resume, eval)."""


class ObservabilityError(UserError):
    """A logging backend the config asks for cannot start (package missing, init failed)."""


class ReportError(UserError):
    """``dancecore report`` cannot read the run it is pointed at."""


# ------------------------------------------------------------------------------------ run errors


class TrainingError(RunError):
    """Training cannot go on (repeated non-finite updates, non-finite advantages, ...)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions, a rank failed): a run error."""

    exit_code = 1


class RewardFailure(RunError):
    """A reward plugin raised, hung, or returned malformed or non-finite scores."""

    def __init__(self, reward: str, reason: str, plugin: str | None = None) -> None:
        self.reward = reward
        self.reason = reason
        self.plugin = plugin or reward
        named = f"reward {reward!r}" + (f" (plugin {self.plugin!r})" if self.plugin != reward else "")
        super().__init__(f"{named} failed: {reason}")


class ReplicaDivergence(RunError, RuntimeError):
    """Ranks that should hold identical weights do not (gradients were not synchronised)."""
