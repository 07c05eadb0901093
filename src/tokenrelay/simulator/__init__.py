"""The built-in OpenAI-compatible upstream: deterministic, fast, and failing on purpose.

What the demo, the tests and the benchmarks talk to when no real provider is configured.
The rooms:

- ``app.py``: the ASGI app (:class:`Simulator`), its counters, and the entry points.
"""

from __future__ import annotations

from tokenrelay.simulator.app import (
    DEFAULT_MODELS,
    ModelSpec,
    Simulator,
    SimulatorConfig,
    SimulatorStats,
    build_reasoning,
    build_text,
    build_tool_calls,
    create_simulator,
    run_simulator,
    serve_simulator,
)

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
