"""The pydantic base every component ``Config`` derives from: strict about unknown keys."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ComponentConfig(BaseModel):
    """Base for component configs: unknown keys are errors, NaN/inf are refused, values are
    validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True, allow_inf_nan=False)
