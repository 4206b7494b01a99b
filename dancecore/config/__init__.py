"""Run configuration: the pydantic schema of a run, YAML loading with ``key=value`` overrides,
two-phase validation (structure, then every component's own ``Config``), and the reference docs
generated from the schema.

May import: contracts, registry, errors. Old imports (``from dancecore.config import load_run``) keep working.
"""

from dancecore.config.schema import *  # noqa: F403  (the old module path keeps working)
from dancecore.config.schema import ConfigError, ResolvedRun, load_run, validate  # noqa: F401
