"""Request bodies of the OpenAI-compatible API (the fields tuneloop acts on; unknown fields are
accepted and ignored, as OpenAI-compatible servers commonly do, so newer SDKs keep working)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import Query

from pydantic import BaseModel, ConfigDict, Field, field_validator


# A page size in a list route's query (OpenAI's lists take 1-100)
Limit = Annotated[int, Query(ge=1, le=100)]
# A job's events: a training curve is read in one page (a run logs about 30 events)
EventLimit = Annotated[int, Query(ge=1, le=1000)]


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Message(Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The content as text (text parts of a multi-part message joined)."""
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


# What a response_format's JSON schema may hold: OpenAI's limits for structured outputs, which
# clients already keep to. They also bound what a client can make the grammar compiler do: a
# 20,000-value enum took 17 s of a core to compile, 256 levels of nesting 10 s.
SCHEMA_DEPTH, SCHEMA_PROPERTIES, SCHEMA_ENUM_VALUES, SCHEMA_CHARACTERS = 10, 5000, 1000, 120_000
LARGE_ENUM, LARGE_ENUM_CHARACTERS = 250, 15_000


def schema_size(schema) -> dict:
    """A JSON schema's levels of nesting (through properties and items), object properties,
    enum values, characters of names, enum and const values, and the characters of its largest
    string enum of more than LARGE_ENUM values."""
    size = {"depth": 0, "properties": 0, "enum_values": 0, "characters": 0, "large_enum": 0}
    stack = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, list):
            stack += [(x, depth) for x in node]
            continue
        if not isinstance(node, dict):
            continue
        size["depth"] = max(size["depth"], depth)
        for key in ("properties", "$defs", "definitions", "patternProperties"):
            if isinstance(node.get(key), dict):
                size["properties"] += len(node[key]) if key == "properties" else 0
                size["characters"] += sum(len(str(k)) for k in node[key])
                stack += [(v, depth + 1) for v in node[key].values()]
        if isinstance(node.get("enum"), list):
            chars = sum(len(str(v)) for v in node["enum"])
            size["enum_values"] += len(node["enum"])
            size["characters"] += chars
            if len(node["enum"]) > LARGE_ENUM:
                size["large_enum"] = max(size["large_enum"], chars)
        if "const" in node:
            size["characters"] += len(str(node["const"]))
        for key in ("items", "additionalProperties", "contains", "not", "if", "then", "else"):
            if isinstance(node.get(key), dict):
                stack.append((node[key], depth + 1))
        for key in ("prefixItems", "anyOf", "oneOf", "allOf"):
            if isinstance(node.get(key), list):
                stack.append((node[key], depth + (key == "prefixItems")))
    return size


def schema_over_limits(schema) -> str | None:
    """What a response_format's schema holds beyond the limits, in words (None: within)."""
    size = schema_size(schema)
    for got, limit, what in ((size["depth"], SCHEMA_DEPTH, "levels of nesting"),
                             (size["properties"], SCHEMA_PROPERTIES, "object properties"),
                             (size["enum_values"], SCHEMA_ENUM_VALUES, "enum values"),
                             (size["characters"], SCHEMA_CHARACTERS,
                              "characters of property names and enum and const values"),
                             (size["large_enum"], LARGE_ENUM_CHARACTERS,
                              f"characters in one enum of more than {LARGE_ENUM} values")):
        if got > limit:
            return (f"{got:,} {what}, over the limit of {limit:,} (the limits of OpenAI's "
                    f"structured outputs: {SCHEMA_DEPTH} levels of nesting, {SCHEMA_PROPERTIES:,} "
                    f"object properties, {SCHEMA_ENUM_VALUES:,} enum values)")
    return None


class JsonSchema(Open):
    name: str = "response"
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _within_limits(cls, schema: dict | None) -> dict | None:
        over = schema_over_limits(schema) if schema is not None else None
        if over:
            raise ValueError(over)
        return schema


class ResponseFormat(Open):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchema | None = None


class StreamOptions(Open):
    include_usage: bool = False


class Generation(Open):
    """Sampling fields shared by chat and text completions."""

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = Field(default=None, json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1}, {"type": "null"},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]})
    # int64, as vLLM bounds it: torch's generators take 64 bits, and a larger number is the
    # client's mistake (a 400 naming the field), not the engine's.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    # tuneloop's extension: a classifier answers REVIEW below this label probability
    review_below: float | None = Field(default=None, ge=0.0, le=1.0)


class CompletionRequest(Generation):
    prompt: str | list[str] = Field(json_schema_extra={"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"},
                             "minItems": 1, "maxItems": 1}]})
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("send one prompt per request (a list of exactly one string)")
        return v if isinstance(v, str) else v[0]


def _exactly_one(*names: str) -> dict:
    """JSON Schema for "exactly one of these fields is given (and not null)"."""
    return {"oneOf": [{"required": [n], "properties": {n: {"not": {"type": "null"}}}}
                      for n in names]}


class FeedbackRequest(Open):
    """Feedback on a logged completion: a rating, a corrected answer, or a preference."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_exactly_one(
        "rating", "correction", "preferred_over"))

    completion_id: str
    choice: int = Field(default=0, ge=0)
    rating: int | None = Field(default=None, ge=-1, le=1)  # 1 good, 0 neutral, -1 bad
    correction: str | None = None
    preferred_over: str | None = None  # another completion id: this one is better than that one
    comment: str | None = Field(default=None, max_length=2048)

    def kind(self) -> str:
        kinds = [k for k, v in (("rating", self.rating), ("correction", self.correction),
                                ("preference", self.preferred_over)) if v is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of rating, correction or preferred_over")
        return kinds[0]


def unix_time(when: dt.datetime | None) -> int | None:
    """A registry timestamp (naive UTC) as the Unix seconds OpenAI's objects carry."""
    return int(when.replace(tzinfo=dt.timezone.utc).timestamp()) if when else None


def as_dict(obj: Any) -> dict:
    return obj.model_dump(exclude_none=True, by_alias=True)
