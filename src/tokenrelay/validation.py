"""Validation of chat requests: every violation is a BadRequest with a clear message.

Shared by ``POST /api/chat`` and ``POST /v1/chat/completions``. Pure functions, no I/O
except :func:`read_json_body`, which reads a request body with a size cap and a deadline.

Fields tokenrelay acts on (``messages``, ``model``, ``stream``, ``stream_options``, ``n``,
``max_tokens``/``max_completion_tokens``, ``tools``) are checked; the OpenAI sampling
fields of :data:`PASSTHROUGH` are type-checked and forwarded; any other field (``top_k``,
``store``, ``service_tier``, vLLM's ``min_p``, ...) is forwarded to the upstream unchanged,
as OpenAI-compatible clients expect: a provider that does not know it answers with its
own error, which is relayed.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from tokenrelay.config import Limits, ModelRoute, Settings
from tokenrelay.errors import BadRequest
from tokenrelay.protocol import chunk_cycle

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

# Sampling and tool parameters passed through to the upstream, with their JSON types.
_NUMBER = (int, float)
PASSTHROUGH: dict[str, tuple[type, ...]] = {
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "presence_penalty": _NUMBER,
    "frequency_penalty": _NUMBER,
    "max_tokens": (int,),
    "max_completion_tokens": (int,),
    "seed": (int,),
    "stop": (str, list),
    "tools": (list,),
    "tool_choice": (str, dict),
    "parallel_tool_calls": (bool,),
    "response_format": (dict,),
    "reasoning_effort": (str,),
    "logit_bias": (dict,),
    "logprobs": (bool,),
    "top_logprobs": (int,),
    "user": (str,),
    "metadata": (dict,),
    "sim": (dict,),  # per-request knobs of the built-in simulator
}
_OWN_FIELDS = frozenset({"messages", "model", "stream", "stream_options", "n"})
_NOT_FORWARDED = frozenset(PASSTHROUGH) | _OWN_FIELDS


@dataclass(slots=True)
class ChatRequest:
    """A validated chat request."""

    route: ModelRoute
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    conversation_id: str | None = None
    stream: bool = True
    include_usage: bool = False

    def upstream_body(self) -> dict[str, Any]:
        return {"messages": self.messages, **self.params}


async def read_json_body(request: Request, limits: Limits) -> Any:
    """The request's JSON body, bounded in size and time."""
    scope = request.scope
    declared = None
    for name, value in scope["headers"]:  # the first one, as ``request.headers.get``
        if name == b"content-length":
            declared = value.decode("latin-1")
            break
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length header")
        if int(declared) > limits.max_body_bytes:
            raise _too_large(limits)
    # ``receive`` directly rather than ``request.stream()``: the same messages without an
    # async generator per request (the body is nearly always in the first message).
    receive = request.receive
    cycle = chunk_cycle(receive)
    if cycle is not None and not cycle.more_body and cycle.message_event.is_set():
        # uvicorn has the whole body already: receive() returns it without waiting, so no
        # timer (an asyncio.timeout is a handle scheduled and cancelled per request).
        chunks = await _receive_body(receive, limits)
    else:
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                chunks = await _receive_body(receive, limits)
        except TimeoutError:
            raise BadRequest(
                f"the request body did not arrive within {limits.body_timeout_s:g} s",
                code="request_timeout",
                status=408,
            ) from None
    body = b"".join(chunks)
    if not body.strip():
        raise BadRequest("the request body is empty; expected a JSON object", code="invalid_json")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None


async def _receive_body(receive: Any, limits: Limits) -> list[bytes]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise _too_large(limits)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


def _too_large(limits: Limits) -> BadRequest:
    return BadRequest(
        f"the request body is larger than {limits.max_body_bytes} bytes",
        code="body_too_large",
        status=413,
    )


# Required fields of each content part type: (path below the part, JSON type).
_PART_FIELDS: dict[str, tuple[tuple[tuple[str, ...], type], ...]] = {
    "text": ((("text",), str),),
    "image_url": ((("image_url",), dict), (("image_url", "url"), str)),
    "input_audio": ((("input_audio",), dict), (("input_audio", "data"), str),
                    (("input_audio", "format"), str)),
    "file": ((("file",), dict),),
    "refusal": ((("refusal",), str),),
}


def _bad_part(where: str, message: str) -> BadRequest:
    return BadRequest(f"{where} {message}", code="invalid_messages")


def _check_part(part: Any, where: str) -> int:
    """Check one content part for its type's required fields; its text length."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _bad_part(where, "must be an object with a string 'type'")
    for path, kind in _PART_FIELDS.get(part["type"], ()):  # other types: passed on as is
        value: Any = part
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind):
            name = "an object" if kind is dict else "a string"
            raise _bad_part(where + "." + ".".join(path),
                            f"is required for a {part['type']!r} part and must be {name}")
    if part["type"] == "file":
        file = part["file"]
        if not isinstance(file.get("file_id"), str) and not isinstance(file.get("file_data"), str):
            raise _bad_part(where + ".file", "needs a string 'file_id' or 'file_data'")
    text = part.get("text", "")
    if not isinstance(text, str):
        raise _bad_part(where + ".text", "must be a string")
    return len(text)


def _content_ok(content: Any, where: str) -> tuple[bool, int]:
    """Whether a message content is a string or a list of valid parts; its length.
    A list with a bad part raises, naming the part's path."""
    if isinstance(content, str):
        return True, len(content)
    if isinstance(content, list):
        total = 0
        for j, part in enumerate(content):
            total += _check_part(part, f"{where}[{j}]")
        return True, total
    return False, 0


def validate_messages(messages: Any, limits: Limits) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be a list of {role, content} objects",
                         code="invalid_messages", param="messages")
    if not messages:
        raise BadRequest("'messages' must not be empty", code="invalid_messages",
                         param="messages")
    if len(messages) > limits.max_messages:
        raise BadRequest(f"too many messages (at most {limits.max_messages})",
                         code="too_many_messages", param="messages")
    clean: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise BadRequest(f"messages[{i}] must be an object", code="invalid_messages",
                             param=f"messages.[{i}]")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list is unhashable
            raise BadRequest(
                f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}",
                code="invalid_messages", param=f"messages.[{i}].role",
            )
        content = msg.get("content")
        if content is None and (role == "assistant" and msg.get("tool_calls")):
            content = ""
        ok, length = _content_ok(content, f"messages[{i}].content")
        if not ok:
            raise BadRequest(
                f"messages[{i}].content must be a string or a list of content parts",
                code="invalid_messages", param=f"messages.[{i}].content",
            )
        if length > limits.max_message_chars:
            raise BadRequest(
                f"messages[{i}].content is longer than {limits.max_message_chars} characters",
                code="message_too_long", param=f"messages.[{i}].content",
            )
        if isinstance(content, str) and "\x00" in content:
            raise BadRequest(f"messages[{i}].content contains a NUL character",
                             code="invalid_messages", param=f"messages.[{i}].content")
        for key in ("name", "tool_call_id"):
            if key in msg and not isinstance(msg[key], str):
                raise BadRequest(f"messages[{i}].{key} must be a string",
                                 code="invalid_messages", param=f"messages.[{i}].{key}")
        if "tool_calls" in msg and not isinstance(msg["tool_calls"], list):
            raise BadRequest(f"messages[{i}].tool_calls must be a list",
                             code="invalid_messages", param=f"messages.[{i}].tool_calls")
        # Other keys of a message (``reasoning_content``, ``refusal``, ...) go upstream
        # unchanged, as the body's own unknown fields do.
        clean.append({**msg, "role": role, "content": content})
    return clean


@functools.cache
def _handled_fields(extra_fields: frozenset[str]) -> frozenset[str]:
    """The fields checked here or by the route (one set per route, built once); any
    other field is forwarded as it is."""
    return _NOT_FORWARDED | extra_fields


def validate_chat(
    data: Any,
    settings: Settings,
    *,
    extra_fields: frozenset[str] = frozenset(),
    default_stream: bool = True,
) -> ChatRequest:
    """Check a chat request body; raises BadRequest naming the first problem."""
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_request")
    messages = validate_messages(data.get("messages"), settings.limits)
    model = data.get("model", settings.default_model)
    if model is None or model == "":
        model = settings.default_model
    if not isinstance(model, str) or not model or len(model) > 200:
        raise BadRequest("'model' must be a model name (see GET /api/models)",
                         code="invalid_model", param="model")
    route = settings.route(model)
    if route is None:
        raise BadRequest(f"unknown model {model!r} (see GET /api/models)",
                         code="model_not_found", status=404, param="model")
    params: dict[str, Any] = {}
    for key, types in PASSTHROUGH.items():
        if key not in data or data[key] is None:
            continue
        value = data[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise BadRequest(f"'{key}' has the wrong type", code="invalid_parameter",
                             param=key)
        params[key] = value
    handled = _handled_fields(extra_fields)
    if not handled.issuperset(data):
        for key, value in data.items():  # unchanged, null included
            if key not in handled:
                params[key] = value
    cap = settings.limits.max_tokens_cap
    for key in ("max_tokens", "max_completion_tokens"):
        if key in params and not 1 <= params[key] <= cap:
            raise BadRequest(f"'{key}' must be between 1 and {cap}", code="invalid_parameter",
                             param=key)
    n = data.get("n")
    if n is not None and (n != 1 or isinstance(n, bool)):
        # Each answer relays one choice; n > 1 would need one relay per choice index.
        raise BadRequest("only n=1 is supported (send n requests for n answers)",
                         code="invalid_parameter", param="n")
    stream = data.get("stream", default_stream)
    if stream is None:
        stream = default_stream
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", code="invalid_parameter",
                         param="stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", code="invalid_parameter",
                         param="stream_options")
    conversation_id = data.get("conversation_id")
    if conversation_id is not None and (
        not isinstance(conversation_id, str) or not 1 <= len(conversation_id) <= 100
    ):
        raise BadRequest("'conversation_id' must be a conversation id string",
                         code="invalid_parameter", param="conversation_id")
    return ChatRequest(
        route=route,
        messages=messages,
        params=params,
        conversation_id=conversation_id,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def parse_last_event_id(value: str | None) -> int:
    """A Last-Event-ID (or ?last_event_id=) value: a non-negative integer, or 0 if absent."""
    if value is None or value == "":
        return 0
    value = value.strip()
    if not value.isdigit() or len(value) > 18:
        raise BadRequest("Last-Event-ID must be a non-negative integer sequence number",
                         code="invalid_last_event_id")
    return int(value)
