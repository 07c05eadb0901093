"""The built-in OpenAI-compatible upstream: deterministic, fast, and failing on purpose.

It is what the demo, the tests and the benchmarks talk to when no real provider is
configured, and it speaks ``GET /v1/models`` and ``POST /v1/chat/completions`` (streaming
and not) exactly like OpenAI. Every answer is a pure function of (model, messages, seed):
tests compute the expected text with :func:`build_text` instead of hard-coding it.
``max_tokens`` truncates that text, so a shorter answer is always a prefix of the longer
one; ``stop`` (a string or up to 4) ends it before the first occurrence of any of them,
with ``finish_reason`` ``"stop"``.

Models (:data:`DEFAULT_MODELS`) cover the behaviours a gateway must survive: a paced chat
model, an unpaced one for benchmarks, ``reasoning_content``, ``<think>`` tags, parallel
tool calls, 429 + ``Retry-After``, a body that stops without ``[DONE]``, and a stall.
:class:`SimulatorConfig` scales every speed so a test runs the same script 50x faster, and
a request may carry ``"sim": {"tokens", "tokens_per_s", "first_token_delay_s",
"reasoning_tokens"}`` to override its model's numbers (absolute values, not scaled).

The rooms, each importing only those above it:

- ``catalogue.py``: the simulated models (plain data) and the config that scales them.
- ``material.py``: the phrases answers are assembled from, and the tokenizer.
- ``text.py``: what the simulator answers, a pure function of (model, messages, seed).
- ``errors.py``: OpenAI-style refusals (status + error body), raised while reading a request.
- ``framing.py``: OpenAI's chunk stream as byte templates (a token costs one dumps).
- ``pacing.py``: when those bytes go out: a steady token rate, in few writes.
- ``plan.py``: a request checked and resolved into everything its answer will send.
- ``app.py``: the ASGI app (:class:`Simulator`): routes, the per-request race, counters.
- ``serve.py``: the app under uvicorn as its own server (``tokenrelay simulate``).

Only the catalogue is imported with the package: ``config.py`` reads it at import time,
and the rest (asyncio, the app) loads on first use of one of its names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tokenrelay.simulator.catalogue import DEFAULT_MODELS, ModelSpec, SimulatorConfig

if TYPE_CHECKING:
    from tokenrelay.simulator.app import Simulator, SimulatorStats, create_simulator
    from tokenrelay.simulator.serve import run_simulator, serve_simulator
    from tokenrelay.simulator.text import build_reasoning, build_text, build_tool_calls

_LAZY = {
    "Simulator": "tokenrelay.simulator.app",
    "SimulatorStats": "tokenrelay.simulator.app",
    "build_reasoning": "tokenrelay.simulator.text",
    "build_text": "tokenrelay.simulator.text",
    "build_tool_calls": "tokenrelay.simulator.text",
    "create_simulator": "tokenrelay.simulator.app",
    "run_simulator": "tokenrelay.simulator.serve",
    "serve_simulator": "tokenrelay.simulator.serve",
}


def __getattr__(name: str) -> Any:
    """Import the room that defines ``name`` on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = [
    "DEFAULT_MODELS",
    "ModelSpec",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "build_reasoning",
    "build_text",
    "build_tool_calls",
    "create_simulator",
    "run_simulator",
    "serve_simulator",
]
