"""The OpenAI wire format kaika serve speaks: request bodies (pydantic), errors, response bodies."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kaika.data.records import text_problem
from kaika.inference.engine import Result


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields kaika does not use are ignored
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension (vLLM has it too)
    repetition_penalty: float | None = Field(None, gt=0)  # extension
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**32)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def valid_unicode(cls, data: Any) -> Any:
        """JSON may carry half of a UTF-16 pair ("\\ud800"), which decodes to text no tokenizer takes."""
        bad = text_problem(data)
        if bad is not None:
            raise ValueError(f"{bad[0] or 'a key'}: {bad[1]}")
        return data

    # OpenAI fields kaika serve does not implement: refused, never accepted and ignored (a client that
    # asked for log-probabilities, tools or JSON output would take an answer without them for one with).
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    def check_supported(self) -> None:
        if self.logprobs not in (None, False, 0) or self.top_logprobs not in (None, 0):
            raise APIError(400, "logprobs are not returned by kaika serve", param="logprobs")
        for name in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(self, name) not in (None, [], "none"):
                raise APIError(400, f"{name}: kaika serve does not call tools or functions", param=name)
        kind = (
            self.response_format.get("type")
            if isinstance(self.response_format, dict)
            else self.response_format
        )
        if kind not in (None, "text"):
            raise APIError(
                400, f"response_format {kind!r}: kaika serve writes plain text only", param="response_format"
            )

    def stops(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(s) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop")
        if any(not x or len(x) > 256 for x in s):
            raise APIError(400, "each stop sequence must be 1 to 256 characters", param="stop")
        return s


class CompletionRequest(Sampling):
    prompt: str | list[str]


class ChatRequest(Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def usage(r: Result) -> dict[str, int]:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
    }


def finish_reason(r: Result) -> str:
    return "length" if r.finish_reason == "length" else "stop"


def completion_body(rid: str, created: int, model: str, r: Result, chat: bool) -> dict[str, Any]:
    """The whole answer of a request without ``stream``."""
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": r.text},
            "finish_reason": finish_reason(r),
        }
    else:
        choice = {"index": 0, "text": r.text, "finish_reason": finish_reason(r), "logprobs": None}
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(r),
    }


class ChunkWriter:
    """Server-sent events of one streamed answer: ``data: {chunk}`` lines, OpenAI's shapes."""

    def __init__(self, rid: str, created: int, model: str, chat: bool):
        self.chat = chat
        self.head = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
        }

    def chunk(self, text: str | None, reason: str | None = None, first: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return self.event({**self.head, "choices": [choice]})

    def usage(self, r: Result) -> str:
        return self.event({**self.head, "choices": [], "usage": usage(r)})

    @staticmethod
    def event(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
