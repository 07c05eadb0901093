"""The built-in OpenAI-compatible upstream: deterministic, fast, and failing on purpose.

What the demo, the tests and the benchmarks talk to when no real provider is configured.
The rooms:

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
    from tokenrelay.simulator.app import (
        Simulator,
        SimulatorStats,
        create_simulator,
    )
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
