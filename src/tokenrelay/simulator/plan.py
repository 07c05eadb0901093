"""Everything one answer will send, decided from the request before the first byte.

The request is checked the way OpenAI checks it (each refusal an :class:`HTTPError`), then
resolved into a :class:`Plan`: the content tokens (continuing an assistant prefill, cut
at a ``stop`` sequence or at ``max_tokens``), the reasoning, the tool calls, the finish
reason, and the pace (the model's numbers times the config's speeds, unless the request's
``"sim"`` object overrides them with absolute values).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenrelay.simulator.catalogue import DROP, STALL, ModelSpec, SimulatorConfig
from tokenrelay.simulator.errors import HTTPError
from tokenrelay.simulator.material import Material
from tokenrelay.simulator.text import (
    after_tool_result,
    build_tool_calls,
    content_tokens,
    message_text,
    prompt_quote,
    reasoning_count,
    request_digest,
    seeded_rng,
    thought_tokens,
)

__all__ = ["Plan", "plan_answer"]


@dataclass(slots=True)
class Plan:
    """Everything one answer will send, decided before the first byte."""

    spec: ModelSpec
    content: list[str]
    reasoning: list[str]
    tool_calls: list[tuple[str, str, str]]
    finish_reason: str
    rate: float
    first_delay: float
    prompt_tokens: int
    include_usage: bool
    digest: bytes
    finished: bool = field(default=False)

    def usage(self) -> dict[str, Any]:
        calls = sum(len(args) // 4 + 1 for _, _, args in self.tool_calls)
        completion = len(self.content) + len(self.reasoning) + calls
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "completion_tokens_details": {"reasoning_tokens": len(self.reasoning)},
        }


def plan_answer(
    request: dict[str, Any], config: SimulatorConfig, models: Mapping[str, ModelSpec],
    material: Material,
) -> Plan:
    """Read a chat completion request into the answer it gets, or raise the
    :class:`HTTPError` OpenAI would answer it with."""
    name = request.get("model")
    if not isinstance(name, str) or not name:
        raise HTTPError(400, "You must provide a model parameter.", param="model")
    spec = models.get(name)
    if spec is None:
        raise HTTPError(404, f"The model `{name}` does not exist or you do not have "
                        "access to it.", code="model_not_found", param="model")
    messages = request.get("messages")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and "role" in m for m in messages)):
        raise HTTPError(400, "'messages' must be a non-empty array of message objects.",
                        param="messages")
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise HTTPError(400, "'max_tokens' must be a positive integer.", param="max_tokens")
    seed = request.get("seed")
    if seed is not None and not _is_int(seed):
        raise HTTPError(400, "'seed' must be an integer.", param="seed")
    sim = request.get("sim") or {}
    if not isinstance(sim, dict):
        raise HTTPError(400, "'sim' must be an object.", param="sim")
    length = _opt_number(sim, "tokens", integer=True)
    reasoning_n = _opt_number(sim, "reasoning_tokens", integer=True)
    rate = _opt_number(sim, "tokens_per_s")
    delay = _opt_number(sim, "first_token_delay_s")
    stops = _stop_sequences(request.get("stop"))
    options = request.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True

    size = None if length is None else int(length)
    prefix = _prefill(spec, messages)
    rest = None  # prefill: the tokens after an assistant prefix of this very answer
    if prefix is not None:
        rest = after_prefix(content_tokens(material, spec, messages[:-1], seed, size),
                             prefix)
        if rest is not None:
            messages = messages[:-1]  # the turn being continued
    digest = request_digest(spec.name, messages, seed)
    reasoning: list[str] = []
    content: list[str] = []
    calls: list[tuple[str, str, str]] = []
    finish = "stop"
    if spec.tools and not after_tool_result(messages):
        calls = build_tool_calls(spec, messages, seed, request.get("tools"))
        finish = "tool_calls"
    else:
        if spec.reasoning and rest is None:  # a continuation does not think again
            count = reasoning_count(spec) if reasoning_n is None else int(reasoning_n)
            reasoning = thought_tokens(seeded_rng(digest, 1), prompt_quote(messages), count)
        full = rest if rest is not None else content_tokens(material, spec, messages,
                                                            seed, size)
        limit = len(full) if max_tokens is None else max_tokens
        cut, stopped = _cut_at_stop(full, stops)
        # A stop sequence counts if it begins within what max_tokens lets through.
        if stopped and sum(map(len, cut)) < sum(map(len, full[:limit])):
            full = cut
        else:
            stopped = False
        if spec.fault in (DROP, STALL):
            content = full[: spec.fault_after]
        elif not stopped and max_tokens is not None and len(full) > max_tokens:
            content, finish = full[:max_tokens], "length"
        else:
            content = full
    return Plan(
        spec=spec, content=content, reasoning=reasoning, tool_calls=calls,
        finish_reason=finish,
        rate=rate if rate is not None else spec.tokens_per_s * config.speed,
        first_delay=(delay if delay is not None
                     else spec.first_token_delay_s * config.first_token_delay_scale),
        prompt_tokens=sum(len(message_text(m.get("content"))) // 4 + 4 for m in messages),
        include_usage=include_usage, digest=digest,
    )


def _prefill(spec: ModelSpec, messages: list[Any]) -> str | None:
    """The assistant prefix a request ends with (prefill: continue that text), if any.
    The tool-calling model refuses prefill with a 400, as providers without it do."""
    last = messages[-1]
    if len(messages) < 2 or last.get("role") != "assistant" or last.get("tool_calls"):
        return None
    text = message_text(last.get("content"))
    if not text:
        return None
    if spec.tools:
        raise HTTPError(400, "This model does not support assistant message prefill "
                        "(simulated).", code="unsupported_prefill", param="messages")
    return text


def after_prefix(tokens: list[str], prefix: str) -> list[str] | None:
    """The tokens after ``prefix`` (the one it ends inside, cut there), or None when the
    answer does not start with it (then the request is answered as a new turn)."""
    if not "".join(tokens).startswith(prefix):
        return None
    rest: list[str] = []
    seen = 0
    for token in tokens:
        if seen >= len(prefix):
            rest.append(token)
        elif seen + len(token) > len(prefix):
            rest.append(token[len(prefix) - seen:])
        seen += len(token)
    return rest


def _stop_sequences(value: Any) -> list[str]:
    """OpenAI's ``stop``: null, a string, or a list of up to 4 non-empty strings."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > 4
            or not all(isinstance(s, str) and s for s in stops)):
        raise HTTPError(400, "'stop' must be a non-empty string or a list of up to 4 "
                        "non-empty strings.", param="stop")
    return stops


def _cut_at_stop(tokens: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """The tokens before the first occurrence of any stop sequence (which is never sent,
    even when it spans tokens), and whether one was found."""
    if not stops:
        return tokens, False
    text = "".join(tokens)
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not found:
        return tokens, False
    cut = min(found)
    out: list[str] = []
    used = 0
    for token in tokens:
        if used + len(token) >= cut:
            if cut > used:
                out.append(token[: cut - used])
            break
        out.append(token)
        used += len(token)
    return out, True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt_number(sim: dict[str, Any], key: str, *, integer: bool = False) -> float | None:
    value = sim.get(key)
    if value is None:
        return None
    ok = _is_int(value) if integer else isinstance(value, int | float) and not isinstance(
        value, bool)
    if not ok or value < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise HTTPError(400, f"'sim.{key}' must be {kind}.", param=f"sim.{key}")
    return float(value)
