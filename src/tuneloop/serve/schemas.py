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


class JsonSchema(Open):
    name: str = "response"
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


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
