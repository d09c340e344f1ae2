"""The base of every configuration section: strict pydantic models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every section: unknown keys and silent type coercions are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)
