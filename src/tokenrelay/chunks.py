"""OpenAI chat-completion stream chunks to normalized :mod:`tokenrelay.events` objects.

Providers disagree on the details, and each disagreement has silently dropped text in
some gateway: reasoning arrives as ``reasoning_content`` (DeepSeek, vLLM), ``reasoning``
(OpenRouter, Ollama, newer vLLM) or ``reasoning_details``; tool-call fragments are keyed
by ``index`` (only the first carries id and name), and some providers omit the index;
usage comes in a last chunk with no choices; errors come *inside* a 200 stream (OpenAI's
``{"error": {...}}``, vLLM's bare ``{"object": "error", "message": ...}``, OpenRouter's
``finish_reason: "error"``); some models write their thoughts inline between ``<think>``
tags. Whatever follows ``[DONE]`` is ignored. :class:`ChunkDecoder` absorbs
all of that and emits few objects: consecutive text (or reasoning) deltas are merged into
the previous item of the output list, so one network read yields a handful of objects.

Pure code, no I/O: the caller feeds the ``data`` of each SSE event (:mod:`tokenrelay.sse`).
"""

from __future__ import annotations

from typing import Any

import orjson
from orjson import JSONDecodeError
from orjson import loads as _loads

from tokenrelay.errors import UpstreamError, UpstreamIncomplete, UpstreamProtocolError, redact
from tokenrelay.events import Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage

__all__ = ["ChunkDecoder"]

_OPEN = "<think>"
_CLOSE = "</think>"
_MAX_MESSAGE = 500
# Words of an in-stream error that mean "try again later" rather than "this will not work".
_RETRYABLE_WORDS = ("overload", "rate limit", "rate_limit", "ratelimit", "capacity", "busy")
_RETRYABLE_CODES = frozenset({"429", "503", "529"})
# OpenRouter's finish_reason "error" without an error object: the provider broke off.
_FINISH_ERROR = 'upstream ended the answer with finish_reason "error"'


class ChunkDecoder:
    """Decode the ``data`` payloads of one chat-completion stream.

    ``think_tags=True`` turns ``<think>...</think>`` in the content into reasoning; tags may
    be split across chunks anywhere, so a trailing ``<``, ``<th``, ``</thin``... (and only
    such a possible start of a tag) is held back until the next chunk or :meth:`flush`.
    """

    __slots__ = ("_held", "_in_think", "_think_tags", "content_chunks", "done", "finish_reason",
                 "model")

    def __init__(self, *, think_tags: bool = False) -> None:
        self._think_tags = think_tags
        self._in_think = False
        self._held = ""
        self.done = False  # [DONE] seen: what follows is ignored
        self.finish_reason: str | None = None  # the first finish_reason seen
        self.model: str | None = None
        self.content_chunks = 0  # chunks that carried text or reasoning: a token estimate

    def feed(self, data: bytes, out: list[Event]) -> None:
        """Decode one SSE data payload and append its events to ``out``.

        Text merges into ``out[-1]`` by mutating it, so pass a list per read whose items
        nobody else holds yet.

        Raises :class:`UpstreamProtocolError` for a corrupt chunk and :class:`UpstreamError`
        for an error object the provider sent inside the stream.
        """
        if not data or self.done:
            return  # a keep-alive, or anything after [DONE]
        try:
            obj = _loads(data)
        except JSONDecodeError:
            if data.strip() == b"[DONE]":
                self.done = True
                return
            raise UpstreamProtocolError("upstream sent a corrupt chunk") from None
        # One flat function on purpose: this runs once per token (bench/bench_parsers.py).
        # A non-object (obj.get fails) or an object of the wrong shape ("choices": {}) is
        # caught below rather than checked for up front.
        try:
            if self.model is None:
                model = obj.get("model")
                if type(model) is str and model:
                    self.model = model
            error = obj.get("error")
            if error is not None:
                raise _error(error)
            choices = obj.get("choices")
            if choices:
                choice = choices[0]
                delta = choice.get("delta")
                if delta:
                    content = delta.get("content")
                    if type(content) is str and len(delta) == 1 and not self._think_tags:
                        # The hot case: {"content": "..."} and nothing else.
                        if content:
                            self.content_chunks += 1
                            if out and type(last := out[-1]) is TextDelta:
                                last.text += content
                            else:
                                out.append(TextDelta(content))
                    else:
                        self._delta(delta, content, out)
                reason = choice.get("finish_reason")
                if reason:
                    if reason == "error":  # OpenRouter: the provider failed mid-answer
                        error = choice.get("error")
                        if error:
                            raise _error(error)
                        raise UpstreamError(_FINISH_ERROR, code="upstream_error", retryable=True)
                    if self.finish_reason is None:
                        self.finish_reason = str(reason)
                    out.append(Finish(str(reason)))
            elif obj.get("object") == "error":  # vLLM: the error object itself, no choices
                raise _error(obj)
            usage = obj.get("usage")
            if usage:
                out.append(_usage(usage))
        except (AttributeError, TypeError, KeyError, IndexError, ValueError):
            raise UpstreamProtocolError("upstream sent a corrupt chunk") from None

    def flush(self, out: list[Event]) -> None:
        """End of stream: release text held back as a possible partial ``<think>`` tag."""
        if self._held:
            held, self._held = self._held, ""
            self._emit(held, out)

    def finish(self) -> None:
        """A clean end of the upstream body: complete after ``[DONE]`` or a
        ``finish_reason`` (several servers never send ``[DONE]``); cut short otherwise."""
        if not self.done and self.finish_reason is None:
            raise UpstreamIncomplete("upstream stream ended before [DONE]")

    def _delta(self, delta: dict[str, Any], content: Any, out: list[Event]) -> None:
        """A delta with more than content: reasoning, tool calls, role, nulls."""
        reasoning = delta.get("reasoning_content")
        if not reasoning or type(reasoning) is not str:
            reasoning = delta.get("reasoning")
            if not reasoning or type(reasoning) is not str:
                reasoning = _reasoning_details(delta.get("reasoning_details"))
        if reasoning or (content and type(content) is str):
            self.content_chunks += 1
        if reasoning:
            if out and type(last := out[-1]) is ReasoningDelta:
                last.text += reasoning
            else:
                out.append(ReasoningDelta(reasoning))
        if content and type(content) is str:
            if self._think_tags:
                self._think(content, out)
            elif out and type(last := out[-1]) is TextDelta:
                last.text += content
            else:
                out.append(TextDelta(content))
        tool_calls = delta.get("tool_calls")
        if tool_calls:
            for position, call in enumerate(tool_calls):
                if type(call) is not dict:
                    continue
                index = call.get("index")
                if type(index) is not int:
                    index = position
                call_id = call.get("id")
                function = call.get("function") or {}
                name = function.get("name")
                arguments = function.get("arguments")
                if arguments is None:
                    arguments = ""
                elif type(arguments) is not str:
                    # A few providers send the arguments as an object, not a JSON string.
                    arguments = orjson.dumps(arguments).decode()
                out.append(
                    ToolCallDelta(
                        index,
                        call_id if type(call_id) is str and call_id else None,
                        name if type(name) is str and name else None,
                        arguments,
                    )
                )

    def _think(self, text: str, out: list[Event]) -> None:
        """Split content on ``<think>``/``</think>``, holding back a possible partial tag."""
        if self._held:
            text = self._held + text
            self._held = ""
        while text:
            tag = _CLOSE if self._in_think else _OPEN
            at = text.find(tag)
            if at >= 0:
                if at:
                    self._emit(text[:at], out)
                self._in_think = not self._in_think
                text = text[at + len(tag) :]
                continue
            # Hold back the longest suffix that is a proper prefix of the tag (it starts
            # with "<"); the rest is final.
            keep = len(text)
            at = text.find("<", max(0, len(text) - len(tag) + 1))
            while at >= 0:
                if tag.startswith(text[at:]):
                    keep = at
                    break
                at = text.find("<", at + 1)
            if keep:
                self._emit(text[:keep], out)
            self._held = text[keep:]
            return

    def _emit(self, text: str, out: list[Event]) -> None:
        """Append text in the current think mode, merging with the previous item."""
        kind = ReasoningDelta if self._in_think else TextDelta
        if out and type(last := out[-1]) is kind:
            last.text += text
        else:
            out.append(kind(text))


def _reasoning_details(details: Any) -> str:
    """The readable text of OpenRouter's ``reasoning_details`` (encrypted parts skipped)."""
    if not details or type(details) is not list:
        return ""
    parts = []
    for item in details:
        if type(item) is dict:
            text = item.get("text") or item.get("summary")
            if type(text) is str:
                parts.append(text)
    return "".join(parts)


def _usage(usage: Any) -> Usage:
    """Usage with missing counts as 0 and a missing total computed."""
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    total = usage.get("total_tokens")
    return Usage(prompt, completion, int(total) if total else prompt + completion)


def _error(error: Any) -> UpstreamError:
    """The exception for an error object sent inside the stream."""
    if type(error) is dict:
        message = error.get("message")
        code = error.get("code")
        kind = error.get("type")
    else:
        message, code, kind = error, None, None
    message = str(message) if message else "upstream reported an error in the stream"
    message = redact(message)[:_MAX_MESSAGE]
    text = f"{code} {kind} {message}".lower()
    retryable = str(code) in _RETRYABLE_CODES or any(w in text for w in _RETRYABLE_WORDS)
    return UpstreamError(message, code="upstream_error", retryable=retryable)


def completion_events(body: bytes, *, think_tags: bool = False) -> tuple[list[Event], str | None]:
    """A whole ``chat.completion`` object (what some servers answer to ``stream: true``)
    as the events its stream would have given, and the model it names. Raises like
    :meth:`ChunkDecoder.feed` (an ``error`` object becomes the provider's error)."""
    try:
        obj = _loads(body)
    except JSONDecodeError:
        obj = None
    if type(obj) is dict and obj.get("error") is not None:
        raise _error(obj["error"])
    choices = obj.get("choices") if type(obj) is dict else None
    if not choices or type(choices) is not list or type(choices[0]) is not dict:
        raise UpstreamProtocolError("upstream answered JSON that is not a chat completion")
    choice = choices[0]
    delta = dict(choice.get("message") or {})
    calls = delta.get("tool_calls")
    if type(calls) is list:  # a message's calls have no index; a stream's fragments do
        delta["tool_calls"] = [{**c, "index": i} if type(c) is dict else c
                               for i, c in enumerate(calls)]
    chunk = {"model": obj.get("model"), "usage": obj.get("usage"),
             "choices": [{"delta": delta, "finish_reason": choice.get("finish_reason")}]}
    decoder = ChunkDecoder(think_tags=think_tags)
    out: list[Event] = []
    decoder.feed(orjson.dumps(chunk), out)
    decoder.flush(out)
    return out, decoder.model
