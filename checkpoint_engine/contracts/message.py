"""The base of every message between processes: a pydantic model that carries its schema version.

A receiver refuses a schema it does not know, and an unknown field is an error, not a silent drop.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA = 1


class Message(BaseModel):
    schema_version: int = Field(default=SCHEMA, alias="schema")
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v != SCHEMA:
            raise ValueError(f"schema {v} is not understood (expected {SCHEMA})")
        return v

    def to_dict(self) -> dict:
        return self.model_dump(by_alias=True)
