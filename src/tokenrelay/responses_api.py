"""The OpenAI Responses API translated onto chat completions: pure, no I/O.

Two directions:

* **Request:** :func:`parse_request` turns a ``POST /v1/responses`` body into a chat
  completions body for the model's upstream (``input`` items become ``messages``, flat
  function tools become chat tools, ``max_output_tokens`` becomes ``max_tokens``, ...).
* **Answer:** a :class:`ResponseFolder` folds the stream's journal frames (``start``, text,
  ``reasoning``, ``tool_call``, ``done``/``error``) into the Responses API's semantic events
  and keeps the ``response`` object they describe. The fold is deterministic: the same
  frames always give the same events with the same ``sequence_number``, so a resume
  (``starting_after=N`` or ``Last-Event-ID: N``) replays the journal from its start and
  skips the events up to N; no sequence number is ever stored.

Item ids derive from the stream id and the output index (``msg_<stream>_0``), so they are
stable across replays and instances too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from tokenrelay import events as ev
from tokenrelay.config import ModelRoute, Settings
from tokenrelay.errors import BadRequest
from tokenrelay.validation import validate_messages

Encoded = tuple[int, bytes]  # (sequence number, the SSE event)
_TAIL = b',"sequence_number":%d}\n\n'

RESPONSE_PREFIX = "resp_"
META_KEY = "responses"  # the journal metadata of a stream started by /v1/responses

_NUMBER = (int, float)
# Same meaning in chat completions: sent to the upstream unchanged.
_FORWARD: dict[str, tuple[type, ...]] = {
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "parallel_tool_calls": (bool,),
    "user": (str,),
    "service_tier": (str,),
    "prompt_cache_key": (str,),
    "safety_identifier": (str,),
}
# Responses-only fields: accepted and echoed in the response object, not sent upstream.
_ACCEPTED = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "max_output_tokens", "stream",
    "background", "store", "previous_response_id", "metadata", "reasoning", "text", "include",
    "truncation", "stream_options", "max_tool_calls", "top_logprobs",
})
# Server-side objects that a chat-completions upstream does not have.
_REFUSED = frozenset({"conversation", "prompt"})
# Chat-completions fields that tokenrelay writes (and bounds) from the Responses ones.
_CHAT_OWN = {"messages": "input", "max_tokens": "max_output_tokens",
             "max_completion_tokens": "max_output_tokens", "n": None}
_TOOL_CHOICES = frozenset({"auto", "none", "required"})


def response_id(stream_id: str) -> str:
    return RESPONSE_PREFIX + stream_id


def stream_id_of(resp_id: str) -> str | None:
    """The journal stream behind a response id, or None if it is not one of ours."""
    if not resp_id.startswith(RESPONSE_PREFIX) or len(resp_id) > 100:
        return None
    return resp_id[len(RESPONSE_PREFIX):] or None


@dataclass(slots=True)
class ResponseRequest:
    """A validated ``POST /v1/responses``."""

    route: ModelRoute
    messages: list[dict[str, Any]]  # the conversation so far, instructions excluded
    params: dict[str, Any]  # chat-completions fields for the upstream
    echo: dict[str, Any]  # request fields the response object repeats
    stream: bool = False
    background: bool = False
    store: bool = True
    previous_response_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    input_from: int = 0

    def upstream_body(self) -> dict[str, Any]:
        instructions = self.echo.get("instructions")
        system = [{"role": "system", "content": instructions}] if instructions else []
        return {"messages": system + self.messages, **self.params, **self.extra}

    def meta(self) -> dict[str, Any]:
        """What the journal keeps beside the frames: enough to answer GET and to continue
        the conversation with ``previous_response_id``. ``input_from``: where this
        request's own input starts in ``messages`` (after the earlier turns)."""
        return {META_KEY: {"echo": self.echo, "messages": self.messages,
                           "background": self.background, "store": self.store,
                           "input_from": self.input_from}}


def _bad(message: str, param: str | None = None, code: str = "invalid_parameter") -> BadRequest:
    error = BadRequest(message, code=code)
    error.param = param
    return error


def parse_request(
    data: Any, settings: Settings, history: list[dict[str, Any]] | None = None
) -> ResponseRequest:
    """Check a ``POST /v1/responses`` body; ``history`` is the conversation of the
    ``previous_response_id`` (loaded by the route). Raises BadRequest naming the field."""
    if not isinstance(data, dict):
        raise _bad("the request body must be a JSON object", code="invalid_request")
    for key in _REFUSED & data.keys():
        if data[key] is not None:
            raise _bad(f"'{key}' is not supported: tokenrelay serves the Responses API over "
                       "a chat-completions upstream (use previous_response_id)", key)
    for key in _CHAT_OWN.keys() & data.keys():
        instead = _CHAT_OWN[key]
        raise _bad(f"'{key}' is a chat-completions field; "
                   + (f"the Responses API takes '{instead}'" if instead
                      else "the Responses API has no such field"), key, "unknown_field")
    model = data.get("model") or settings.default_model
    if not isinstance(model, str) or not model or len(model) > 200:
        raise _bad("'model' must be a model name (see GET /v1/models)", "model",
                   "invalid_model")
    route = settings.route(model)
    if route is None:
        error = BadRequest(f"The model '{model}' does not exist (see GET /v1/models)",
                           code="model_not_found", status=404)
        error.param = "model"
        raise error
    flags = {}
    for key, default in (("stream", False), ("background", False), ("store", True)):
        value = data.get(key)
        if value is None:
            value = default
        if not isinstance(value, bool):
            raise _bad(f"'{key}' must be a boolean", key)
        flags[key] = value
    if flags["background"] and not flags["store"]:
        raise _bad("background responses need store=true", "store")
    instructions = data.get("instructions")
    limits = settings.limits
    if instructions is not None and (
        not isinstance(instructions, str) or "\x00" in instructions
        or len(instructions) > limits.max_message_chars
    ):
        raise _bad("'instructions' must be a string of at most "
                   f"{limits.max_message_chars} characters, without NUL", "instructions")
    new = input_messages(data.get("input"))
    messages = validate_messages((history or []) + new, limits)
    if history and len(orjson.dumps(messages)) > limits.max_body_bytes:
        # A chain of previous_response_id must not grow past what one request could send.
        raise _bad(f"the conversation is larger than {limits.max_body_bytes} bytes; start "
                   "a new one", "previous_response_id", "conversation_too_long")
    params = _chat_params(data, settings)
    extra = {k: v for k, v in data.items()
             if k not in _ACCEPTED and k not in _FORWARD and k not in _REFUSED}
    previous = data.get("previous_response_id")
    echo = {
        "instructions": instructions,
        "tools": data.get("tools") or [],
        "tool_choice": data.get("tool_choice") or "auto",
        "max_output_tokens": data.get("max_output_tokens"),
        "temperature": data.get("temperature"),
        "top_p": data.get("top_p"),
        "parallel_tool_calls": data.get("parallel_tool_calls", True),
        "metadata": data.get("metadata") or {},
        "reasoning": data.get("reasoning") or {"effort": None, "summary": None},
        "text": data.get("text") or {"format": {"type": "text"}},
        "truncation": data.get("truncation") or "disabled",
        "user": data.get("user"),
        "previous_response_id": previous,
        "store": flags["store"],
        "background": flags["background"],
    }
    if not isinstance(echo["metadata"], dict) or len(echo["metadata"]) > 16:
        raise _bad("'metadata' must be an object of at most 16 keys", "metadata")
    return ResponseRequest(route=route, messages=messages, params=params, echo=echo,
                           stream=flags["stream"], background=flags["background"],
                           store=flags["store"], previous_response_id=previous, extra=extra,
                           input_from=len(history or []))


def _chat_params(data: dict[str, Any], settings: Settings) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, types in _FORWARD.items():
        value = data.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise _bad(f"'{key}' has the wrong type", key)
        params[key] = value
    limit = data.get("max_output_tokens")
    if limit is not None:
        cap = settings.limits.max_tokens_cap
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= cap:
            raise _bad(f"'max_output_tokens' must be an integer between 1 and {cap}",
                       "max_output_tokens")
        params["max_tokens"] = limit
    tools = data.get("tools")
    if tools:
        params["tools"] = chat_tools(tools)
    choice = data.get("tool_choice")
    if choice is not None:
        params["tool_choice"] = chat_tool_choice(choice)
    response_format = chat_response_format(data.get("text"))
    if response_format is not None:
        params["response_format"] = response_format
    # The chat-completions names of the two knobs that have one.
    reasoning, text = data.get("reasoning"), data.get("text")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        params["reasoning_effort"] = reasoning["effort"]
    if isinstance(text, dict) and isinstance(text.get("verbosity"), str):
        params["verbosity"] = text["verbosity"]
    return params


def chat_tools(tools: Any) -> list[dict[str, Any]]:
    """Flat Responses function tools -> chat-completions tools."""
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _bad(f"tools[{i}]: tool type {kind!r} is not supported over a "
                       "chat-completions upstream (function tools only)", f"tools[{i}]")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name must be a string", f"tools[{i}].name")
        function: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
        choice.get("name"), str
    ):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad("'tool_choice' must be auto, none, required or {type: function, name}",
               "tool_choice")


def chat_response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt, dict):
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise _bad("'text.format.type' must be text, json_object or json_schema", "text.format")


# -- input items -> chat messages -------------------------------------------------------


def input_messages(items: Any) -> list[dict[str, Any]]:
    """``input`` (a string or a list of items) -> chat-completions messages.

    Consecutive ``function_call`` items (and the assistant text before them) become one
    assistant message with ``tool_calls``, as chat completions expects; reasoning items
    are dropped (chat upstreams do not take them back).
    """
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("'input' must be a string or a non-empty list of items", "input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _bad(f"input[{i}] must be an object", f"input[{i}]")
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item, i))
        elif kind == "function_call":
            call = {"id": _str(item, "call_id", i), "type": "function",
                    "function": {"name": _str(item, "name", i),
                                 "arguments": _str(item, "arguments", i)}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and (
                last.get("tool_calls") or not isinstance(last.get("content"), list)
            ):
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _parts_text(output, i)
            out.append({"role": "tool", "tool_call_id": _str(item, "call_id", i),
                        "content": text})
        elif kind == "reasoning":
            continue
        else:
            raise _bad(f"input[{i}]: item type {kind!r} is not supported over a "
                       "chat-completions upstream", f"input[{i}].type")
    return out


def item_ref(item_id: Any) -> tuple[str, int] | None:
    """(stream id, output index) of one of our output item ids (``msg_<stream>_<n>``)."""
    if not isinstance(item_id, str) or len(item_id) > 120:
        return None
    prefix, _, rest = item_id.partition("_")
    stream_id, _, index = rest.rpartition("_")
    if prefix not in ("msg", "fc", "rs") or not stream_id or not index.isdigit():
        return None
    return stream_id, int(index)


def _str(item: dict[str, Any], key: str, i: int) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _bad(f"input[{i}].{key} must be a string", f"input[{i}].{key}")
    return value


def _message(item: dict[str, Any], i: int) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise _bad(f"input[{i}].role must be user, system, developer or assistant",
                   f"input[{i}].role")
    # "developer" is OpenAI's newer name for "system"; most chat upstreams know only the latter.
    chat_role = "system" if role == "developer" else role
    content = item.get("content")
    if isinstance(content, str):
        return {"role": chat_role, "content": content}
    if not isinstance(content, list):
        raise _bad(f"input[{i}].content must be a string or a list of parts",
                   f"input[{i}].content")
    if role == "user" and any(isinstance(p, dict) and p.get("type") == "input_image"
                              for p in content):
        return {"role": "user", "content": [_user_part(p, i) for p in content]}
    return {"role": chat_role, "content": _parts_text(content, i)}


def _parts_text(parts: Any, i: int) -> str:
    if not isinstance(parts, list):
        raise _bad(f"input[{i}]: expected a string or a list of text parts", f"input[{i}]")
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") not in (
            "input_text", "output_text", "text", "refusal"
        ):
            kind = part.get("type") if isinstance(part, dict) else None
            raise _bad(f"input[{i}]: content part type {kind!r} is not supported here",
                       f"input[{i}].content")
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise _bad(f"input[{i}]: a text part needs a string 'text'", f"input[{i}].content")
        texts.append(text)
    return "".join(texts)


def _user_part(part: Any, i: int) -> dict[str, Any]:
    if isinstance(part, dict) and part.get("type") == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise _bad(f"input[{i}]: input_image needs an image_url (file ids are not "
                       "supported)", f"input[{i}].content")
        image: dict[str, Any] = {"url": url}
        if part.get("detail"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    return {"type": "text", "text": _parts_text([part], i)}


# -- journal frames -> Responses events --------------------------------------------------


class ResponseFolder:
    """Folds one stream's journal frames into Responses events and the response object.

    Feed it every frame from the first (``start``) on, in order. Output items open as the
    answer switches kind (reasoning, message text, function calls) and close when the next
    kind begins or the answer ends.
    """

    def __init__(self, stream_id: str, meta: dict[str, Any]) -> None:
        info = meta.get(META_KEY) or {}
        self.stream_id = stream_id
        self.id = response_id(stream_id)
        self.echo: dict[str, Any] = info.get("echo") or {}
        self.background = bool(info.get("background"))
        self.created_at = meta.get("created", 0)
        self.model = meta.get("model", "")
        self.seq = -1  # the last sequence number given; OpenAI's first event is 0
        self.status = "queued" if self.background else "in_progress"
        self.output: list[dict[str, Any]] = []
        self.open: list[int] = []  # output indexes of items not yet done
        self.kind: str | None = None  # kind of the open items
        self.calls: dict[int, int] = {}  # chat tool-call index -> output index
        # Deltas (JSON strings) of open items not yet joined into them: decoding and a
        # str += per token would cost more than the rest of the relay.
        self.pending: dict[int, list[bytes]] = {}
        self.head = self.tail = b""  # of the open text or reasoning item's delta events
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self.ended = False

    # The response object ------------------------------------------------------------

    def sync(self) -> None:
        """Join the pending deltas into their items (``output`` is then up to date)."""
        for index, parts in self.pending.items():
            if parts:
                # One decode for all the JSON strings gathered since the last sync.
                text = "".join(orjson.loads(b"[" + b",".join(parts) + b"]"))
                item = self.output[index]
                kind = item["type"]
                if kind == "message":
                    item["content"][0]["text"] += text
                elif kind == "reasoning":
                    item["summary"][0]["text"] += text
                else:
                    item["arguments"] += text
                parts.clear()

    def snapshot(self) -> dict[str, Any]:
        self.sync()
        echo = self.echo
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": self.status, "background": self.background, "error": self.error,
            "incomplete_details": self.incomplete,
            "instructions": echo.get("instructions"),
            "max_output_tokens": echo.get("max_output_tokens"), "model": self.model,
            "output": [dict(item) for item in self.output],
            "parallel_tool_calls": echo.get("parallel_tool_calls", True),
            "previous_response_id": echo.get("previous_response_id"),
            "reasoning": echo.get("reasoning"), "store": echo.get("store", True),
            "temperature": echo.get("temperature"), "text": echo.get("text"),
            "tool_choice": echo.get("tool_choice", "auto"), "tools": echo.get("tools", []),
            "top_p": echo.get("top_p"), "truncation": echo.get("truncation", "disabled"),
            "usage": self.usage, "user": echo.get("user"), "metadata": echo.get("metadata", {}),
        }

    # Events -------------------------------------------------------------------------

    def _event(self, out: list[Encoded], kind: str, **fields: Any) -> None:
        self.seq += 1
        data = ev.dumps({"type": kind, **fields, "sequence_number": self.seq})
        out.append((self.seq, b"id: %d\nevent: %s\ndata: %s\n\n" % (
            self.seq, kind.encode(), data)))

    def _delta(self, out: list[Encoded], head: bytes, text: bytes, tail: bytes) -> None:
        """A text or reasoning delta, from the journal's JSON string as it is: the
        per-token path, so no decode and no dict (the same bytes as ``_event``)."""
        self.seq += 1
        seq = self.seq
        out.append((seq, head % seq + text + tail % seq))

    def feed(self, frames: list[bytes]) -> list[Encoded]:
        out: list[Encoded] = []
        for raw in frames:
            _, name, data = ev.parse_frame(raw)
            # Text and reasoning frames are {"content":<str>} and {"reasoning":<str>}.
            if name is None:
                self._text(out, data[11:-1])
                continue
            if name == ev.REASONING:
                self._reasoning(out, data[13:-1])
                continue
            payload = orjson.loads(data)
            if name == ev.START:
                self.model = payload.get("model") or self.model
                self._event(out, "response.created", response=self.snapshot())
                self.status = "in_progress"
                self._event(out, "response.in_progress", response=self.snapshot())
            elif name == ev.TOOL_CALL:
                self._tool_call(out, payload)
            elif name in (ev.DONE, ev.ERROR):
                self._end(out, name, payload)
        return out

    def _begin(self, out: list[Encoded], kind: str, item: dict[str, Any]) -> int:
        if self.kind != kind:
            self._close_all(out, "completed")
        index = len(self.output)
        self.output.append(item)
        self.open.append(index)
        self.pending[index] = []
        self.kind = kind
        self._event(out, "response.output_item.added", output_index=index, item=dict(item))
        return index

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self.stream_id}_{len(self.output)}"

    def _text(self, out: list[Encoded], delta: bytes) -> None:
        if self.kind != "message":
            index = self._begin(out, "message", {
                "id": self._item_id("msg"), "type": "message", "status": "in_progress",
                "role": "assistant", "content": []})
            item = self.output[index]
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"] = [part]
            self._event(out, "response.content_part.added", item_id=item["id"],
                        output_index=index, content_index=0, part=dict(part))
            self.head = _head("response.output_text.delta", item["id"], index,
                              b',"content_index":0')
            self.tail = b',"logprobs":[]' + _TAIL
        self.pending[self.open[-1]].append(delta)
        self._delta(out, self.head, delta, self.tail)

    def _reasoning(self, out: list[Encoded], delta: bytes) -> None:
        if self.kind != "reasoning":
            index = self._begin(out, "reasoning", {
                "id": self._item_id("rs"), "type": "reasoning", "summary": []})
            item = self.output[index]
            item["summary"] = [{"type": "summary_text", "text": ""}]
            self._event(out, "response.reasoning_summary_part.added", item_id=item["id"],
                        output_index=index, summary_index=0,
                        part={"type": "summary_text", "text": ""})
            self.head = _head("response.reasoning_summary_text.delta", item["id"], index,
                              b',"summary_index":0')
            self.tail = _TAIL
        self.pending[self.open[-1]].append(delta)
        self._delta(out, self.head, delta, self.tail)

    def _tool_call(self, out: list[Encoded], payload: dict[str, Any]) -> None:
        chat_index = payload["index"]
        index = self.calls.get(chat_index)
        if index is None or index not in self.open:
            index = self._begin(out, "function_call", {
                "id": self._item_id("fc"), "type": "function_call", "status": "in_progress",
                "call_id": payload.get("id") or f"call_{self.stream_id}_{chat_index}",
                "name": payload.get("name") or "", "arguments": ""})
            self.calls[chat_index] = index
        item = self.output[index]
        if payload.get("name") and not item["name"]:
            item["name"] = payload["name"]
        delta = payload.get("arguments") or ""
        if delta:
            self.pending[index].append(ev.dumps(delta))
            self._event(out, "response.function_call_arguments.delta", item_id=item["id"],
                        output_index=index, delta=delta)

    def _close_all(self, out: list[Encoded], status: str) -> None:
        self.sync()
        for index in self.open:
            item = self.output[index]
            kind = item["type"]
            if kind == "message":
                part = item["content"][0]
                self._event(out, "response.output_text.done", item_id=item["id"],
                            output_index=index, content_index=0, text=part["text"], logprobs=[])
                self._event(out, "response.content_part.done", item_id=item["id"],
                            output_index=index, content_index=0, part=dict(part))
            elif kind == "reasoning":
                part = item["summary"][0]
                self._event(out, "response.reasoning_summary_text.done", item_id=item["id"],
                            output_index=index, summary_index=0, text=part["text"])
                self._event(out, "response.reasoning_summary_part.done", item_id=item["id"],
                            output_index=index, summary_index=0, part=dict(part))
            elif kind == "function_call":
                self._event(out, "response.function_call_arguments.done", item_id=item["id"],
                            output_index=index, name=item["name"], arguments=item["arguments"])
            if "status" in item:
                item["status"] = status
            self._event(out, "response.output_item.done", output_index=index,
                        item=_copy(item))
        self.open = []
        self.pending = {}
        self.kind = None

    def _end(self, out: list[Encoded], name: str, payload: dict[str, Any]) -> None:
        state = payload.get("state")
        self.model = payload.get("model") or self.model
        usage = payload.get("usage") or {}
        prompt = usage.get("prompt_tokens") or 0
        completion = usage.get("completion_tokens") or 0
        self.usage = {"input_tokens": prompt,
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": completion,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": usage.get("total_tokens") or prompt + completion}
        if name == ev.DONE and state == ev.COMPLETE:
            reason = payload.get("finish_reason")
            self._close_all(out, "incomplete" if reason == "length" else "completed")
            if reason in ("length", "content_filter"):
                self.status = "incomplete"
                self.incomplete = {"reason": "max_output_tokens" if reason == "length"
                                   else "content_filter"}
                self._event(out, "response.incomplete", response=self.snapshot())
            else:
                self.status = "completed"
                self._event(out, "response.completed", response=self.snapshot())
        elif name == ev.DONE:  # cancelled: OpenAI has no event for it; the stream ends
            self._close_all(out, "incomplete")
            self.status = "cancelled"
        else:
            error = payload.get("error") or {}
            code, message = error.get("code") or "server_error", error.get("message") or ""
            self._close_all(out, "incomplete")
            self.status = "failed"
            # response.error.code is an enum in OpenAI's API; ours stays in the error event.
            self.error = {"code": "rate_limit_exceeded" if "rate_limited" in code
                          else "server_error", "message": message}
            self._event(out, "error", code=code, message=message, param=None)
            self._event(out, "response.failed", response=self.snapshot())
        self.ended = True


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    copied = dict(item)
    for key in ("content", "summary"):
        if key in copied:
            copied[key] = [dict(part) for part in copied[key]]
    return copied


# A heartbeat on a Responses stream is a comment *line*, with no blank line after it.
# openai-python keeps the last ``id:`` across events (as the SSE spec says) and then
# dispatches an event at any blank line while it has one, even with no data: a
# ``: heartbeat\n\n`` block after the first event reaches it as an empty event, whose
# JSON it fails to parse. A lone comment line is skipped by every SSE parser, and the
# next event's blank line ends both.
HEARTBEAT = b": heartbeat\n"


def encode(events: list[Encoded], after: int) -> bytes:
    """The SSE bytes of the events whose sequence number is above ``after``."""
    return b"".join(data for seq, data in events if seq > after)


def _head(kind: str, item_id: str, index: int, extra: bytes) -> bytes:
    """The bytes of a delta event up to its ``delta`` value, ``%d`` for the sequence
    number in the ``id:`` line; keys in the order ``_event`` writes them."""
    name = kind.encode()
    return (b"id: %d\nevent: " + name + b'\ndata: {"type":"' + name + b'","item_id":'
            + ev.dumps(item_id).replace(b"%", b"%%") + b',"output_index":%d' % index
            + extra + b',"delta":')


def input_items(messages: list[dict[str, Any]], stream_id: str) -> list[dict[str, Any]]:
    """Chat messages back as Responses input items, with stable ids (``in_<stream>_<n>``).
    A ``developer`` message was sent, and is listed, as ``system``."""
    items: list[dict[str, Any]] = []

    def add(item: dict[str, Any]) -> None:
        items.append({"id": f"in_{stream_id}_{len(items)}", **item, "status": "completed"})

    for msg in messages:
        role, content = msg["role"], msg.get("content")
        if role == "tool":
            add({"type": "function_call_output", "call_id": msg.get("tool_call_id"),
                 "output": content if isinstance(content, str) else ""})
            continue
        if content:
            kind = "output_text" if role == "assistant" else "input_text"
            parts: list[dict[str, Any]] = [{"type": kind, "text": content}] \
                if isinstance(content, str) else [
                {"type": "input_image", "image_url": p["image_url"]["url"],
                 "detail": p["image_url"].get("detail", "auto")}
                if p.get("type") == "image_url" else {"type": kind, "text": p.get("text", "")}
                for p in content]
            if role == "assistant":
                for part in parts:
                    part["annotations"] = []
            add({"type": "message", "role": role, "content": parts})
        for call in msg.get("tool_calls") or []:
            function = call.get("function") or {}
            add({"type": "function_call", "call_id": call.get("id"),
                 "name": function.get("name"), "arguments": function.get("arguments")})
    return items


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as chat messages (for ``previous_response_id``)."""
    items = [item for item in output if item.get("type") in ("message", "function_call")]
    return input_messages(items) if items else []
