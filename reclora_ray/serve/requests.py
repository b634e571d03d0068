"""The JSON bodies the service accepts. Strict: wrong types, unknown fields and out-of-range
values are rejected (422) with the offending field named, never coerced."""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, WithJsonSchema, model_validator


def _catalogue_id(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("a catalogue id is an integer or a string")
    if isinstance(value, int) and not 0 <= value < 2**63:
        raise ValueError("an integer id is in 0..2^63-1")
    if isinstance(value, str) and not 1 <= len(value) <= 256:
        raise ValueError("a string id has 1 to 256 characters")
    return value


# Catalogue ids (items.parquet / users.parquet raw_id): a number or a string, matched by its text.
CatalogueId = Annotated[
    Any,
    PlainValidator(_catalogue_id),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]}),
]
ItemId = CatalogueId
UserId = CatalogueId
Timestamp = Annotated[int, Field(ge=0, lt=2**62, description="unix seconds")]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Behaviour(Strict):
    """A behaviour the prepared data does not hold yet."""

    item_id: ItemId
    rating: float = Field(ge=0, le=5, allow_inf_nan=False)
    timestamp: Optional[Timestamp] = None


class UserContext(Strict):
    """What the user's state is when scored."""

    history: list[Behaviour] = Field(default_factory=list, description="new behaviours, oldest first")
    timestamp: Optional[Timestamp] = Field(None, description="scoring time (unix seconds); default: now")
    as_of_position: Optional[int] = Field(
        None, ge=0, description="keep only the first N known behaviours (replays an offline sample's pos)"
    )

    @model_validator(mode="after")
    def _history_oldest_first(self):
        stamps = [(i, b.timestamp) for i, b in enumerate(self.history) if b.timestamp is not None]
        for (_, before), (i, after) in zip(stamps, stamps[1:]):
            if after < before:
                raise ValueError(f"history must be oldest first: history[{i}].timestamp {after} is before {before}")
        return self


class ScoreRequest(UserContext):
    user_id: UserId
    candidates: list[ItemId] = Field(min_length=1)


class ExportRequest(UserContext):
    item_id: ItemId = Field(description="the target item: R_c, and so the gate, depends on it")


def describe(error: ValidationError | list[dict]) -> str:
    """One line naming every offending field, e.g. `candidates.2: Input should be a valid integer`."""
    errors = error.errors() if isinstance(error, ValidationError) else error
    parts = []
    for e in errors:
        where = ".".join(str(part) for part in e.get("loc", ()) if part != "body")
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts)
