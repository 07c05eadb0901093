"""What the simulator answers: a pure function of (model, messages, seed).

Tests compute the expected text with :func:`build_text` instead of hard-coding it.
``max_tokens`` (or the ``sim.tokens`` length) truncates or extends that text, so a shorter
answer is always a prefix of the longer one. Reasoning (:func:`build_reasoning`) and tool
calls (:func:`build_tool_calls`) come from the same digest, with their own salts.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

import orjson

from tokenrelay.simulator.catalogue import DEFAULT_MODELS, ModelSpec
from tokenrelay.simulator.material import (
    CITIES,
    DEFAULT_TOOLS,
    INTROS,
    THOUGHTS,
    Material,
    tokenize,
)

__all__ = [
    "after_tool_result",
    "build_reasoning",
    "build_text",
    "build_tool_calls",
    "content_tokens",
    "message_text",
    "prompt_quote",
    "reasoning_count",
    "request_digest",
    "seeded_rng",
    "thought_tokens",
]


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def prompt_quote(messages: Sequence[Any]) -> str:
    """The first words of the last user message, whitespace collapsed."""
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            words = message_text(msg.get("content")).split()
            if not words:
                break
            text = " ".join(words[:8])
            if len(text) > 60:
                return text[:59].rstrip() + "…"
            return text + ("…" if len(words) > 8 else "")
    return "your message"


def request_digest(model: str, messages: Any, seed: Any) -> bytes:
    return hashlib.sha256(
        orjson.dumps([model, messages, seed], option=orjson.OPT_SORT_KEYS)
    ).digest()


def seeded_rng(digest: bytes, salt: int) -> random.Random:
    return random.Random(int.from_bytes(digest[:8], "big") ^ salt)


def _paragraph(rng: random.Random, m: Material, out: list[str], first: list[str] | None) -> None:
    """Append 2-4 sentences; ``first`` (already tokenized) opens the paragraph."""
    picks = rng.sample(range(len(m.sentences)), rng.randint(2, 4))
    if first is not None:
        out.extend(first)
    else:
        head = m.sentences[picks.pop(0)]
        out.append(head[0][1:])  # drop the joining space at the start of a paragraph
        out.extend(head[1:])
    for i in picks:
        out.extend(m.sentences[i])
    out.append("\n\n")


def _section(rng: random.Random, m: Material, out: list[str]) -> None:
    """One more block of markdown, for answers longer than the natural length."""
    kind = rng.randrange(4)
    if kind == 0:
        out.extend(rng.choice(m.subheadings))
        out.append("\n\n")
        _paragraph(rng, m, out, None)
    elif kind == 1:
        for i in rng.sample(range(len(m.bullets)), rng.randint(3, 5)):
            out.extend(m.bullets[i])
        out.append("\n")
    elif kind == 2:
        out.extend(rng.choice(m.code))
        out.append("\n\n")
    else:
        _paragraph(rng, m, out, None)


def _answer(rng: random.Random, m: Material, quote: str, length: int | None) -> list[str]:
    out: list[str] = list(rng.choice(m.titles))
    out.append("\n\n")
    intro = tokenize(rng.choice(INTROS).format(q=quote))
    _paragraph(rng, m, out, intro)
    target = rng.randint(170, 380)
    out.extend(rng.choice(m.subheadings))
    out.append("\n\n")
    for i in rng.sample(range(len(m.bullets)), rng.randint(3, 5)):
        out.extend(m.bullets[i])
    out.append("\n")
    tail = [*rng.choice(m.code), "\n\n"]
    if rng.random() < 0.4:
        tail += [*rng.choice(m.tables), "\n\n"]
    closing = rng.choice(m.closings)
    tail += [closing[0][1:], *closing[1:]]
    while len(out) + len(tail) < target - 20:
        _paragraph(rng, m, out, None)
    out.extend(tail)
    if length is not None:
        while len(out) < length:
            out.append("\n\n")
            _section(rng, m, out)
        del out[length:]
    return out


def thought_tokens(rng: random.Random, quote: str, count: int) -> list[str]:
    out: list[str] = []
    order: list[str] = []
    while len(out) < count:
        if not order:  # a shuffled cycle, so consecutive thoughts differ
            order = rng.sample(THOUGHTS, len(THOUGHTS))
        line = order.pop().format(q=quote)
        out.extend(tokenize((" " if out else "") + line))
    del out[count:]
    return out


def reasoning_count(spec: ModelSpec) -> int:
    return round(spec.reasoning_s * (spec.tokens_per_s or 60.0))


def content_tokens(
    m: Material, spec: ModelSpec, messages: Any, seed: Any, length: int | None
) -> list[str]:
    digest = request_digest(spec.name, messages, seed)
    quote = prompt_quote(messages)
    if spec.think_tags:
        thoughts = thought_tokens(seeded_rng(digest, 1), quote, reasoning_count(spec))
        body = _answer(seeded_rng(digest, 0), m, quote, None)
        tokens = ["<think>", "\n", *thoughts, "\n", "</think>", "\n\n", *body]
        if length is not None:
            filler = _answer(seeded_rng(digest, 0), m, quote, length)
            tokens.extend(filler[len(body) :])
            del tokens[length:]
        return tokens
    return _answer(seeded_rng(digest, 0), m, quote, length)


def _model(model: str | ModelSpec) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    for spec in DEFAULT_MODELS:
        if spec.name == model:
            return spec
    return ModelSpec(model, "")


def build_text(
    model: str | ModelSpec,
    messages: Sequence[Any],
    seed: int | None = None,
    max_tokens: int | None = None,
    *,
    length: int | None = None,
) -> list[str]:
    """The content tokens the simulator streams for this request, so tests can compute
    the exact expected text. ``length`` is the ``sim.tokens`` override. Tool-call
    answers have no content (see :func:`build_tool_calls`)."""
    spec = _model(model)
    if spec.tools and not after_tool_result(messages):
        return []
    tokens = content_tokens(Material(), spec, list(messages), seed, length)
    return tokens if max_tokens is None else tokens[:max_tokens]


def build_reasoning(
    model: str | ModelSpec, messages: Sequence[Any], seed: int | None = None,
    *, count: int | None = None,
) -> list[str]:
    """The ``reasoning_content`` tokens of a reasoning model (empty for other models)."""
    spec = _model(model)
    if not spec.reasoning:
        return []
    n = reasoning_count(spec) if count is None else count
    digest = request_digest(spec.name, list(messages), seed)
    return thought_tokens(seeded_rng(digest, 1), prompt_quote(messages), n)


def after_tool_result(messages: Sequence[Any]) -> bool:
    return bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool"


def build_tool_calls(
    model: str | ModelSpec,
    messages: Sequence[Any],
    seed: int | None = None,
    tools: Sequence[Any] | None = None,
) -> list[tuple[str, str, str]]:
    """The two parallel tool calls ``(id, name, arguments_json)`` a tools model makes.
    Names and argument keys come from the request's ``tools`` when given."""
    spec = _model(model)
    digest = request_digest(spec.name, list(messages), seed)
    rng = seeded_rng(digest, 2)
    declared: list[tuple[str, tuple[str, ...]]] = []
    for tool in tools or ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            keys = tuple(props)[:4] if isinstance(props, dict) else ()
            declared.append((fn["name"], keys))
    choices = declared or list(DEFAULT_TOOLS)
    calls = []
    for i in range(2):
        name, keys = choices[i % len(choices)]
        args: dict[str, str] = {}
        for key in keys or ("query",):
            if key == "unit":
                args[key] = rng.choice(("celsius", "fahrenheit"))
            elif key == "timezone":
                args[key] = rng.choice(("Europe/Paris", "Asia/Tokyo", "America/Lima"))
            elif key == "query":
                args[key] = prompt_quote(messages)
            else:
                args[key] = rng.choice(CITIES)
        call_id = f"call_{digest.hex()[8 * i : 8 * i + 24]}"
        calls.append((call_id, name, orjson.dumps(args).decode()))
    return calls
