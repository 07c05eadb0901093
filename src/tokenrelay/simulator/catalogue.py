"""The simulated models: what ``/v1/models`` lists and how each one behaves.

Plain data with no tokenrelay imports, so ``config.py`` can route these names to the
simulator without loading it. :data:`DEFAULT_MODELS` covers the behaviours a gateway must
survive: a paced chat model, an unpaced one for benchmarks, ``reasoning_content``,
``<think>`` tags, parallel tool calls, 429 + ``Retry-After``, a body that stops without
``[DONE]``, and a stall. :class:`SimulatorConfig` chooses the table and scales its speeds.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MODELS", "DROP", "FAULTS", "FLAKY", "STALL", "ModelSpec", "SimulatorConfig"]

FLAKY = "flaky"
DROP = "drop"
STALL = "stall"
FAULTS = frozenset({FLAKY, DROP, STALL})


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One simulated model. ``tokens_per_s == 0`` means unpaced (as fast as the socket)."""

    name: str
    description: str
    tokens_per_s: float = 60.0
    first_token_delay_s: float = 0.3
    reasoning: bool = False  # stream ``reasoning_content`` before the answer
    think_tags: bool = False  # put a ``<think>...</think>`` block at the start of content
    tools: bool = False  # answer with two parallel tool calls
    fault: str | None = None  # "flaky" | "drop" | "stall"
    reasoning_s: float = 0.0  # how long it thinks, at its own token rate
    fault_after: int = 0  # content tokens sent before "drop" or "stall"

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"ModelSpec {self.name!r}: unknown fault {self.fault!r}")
        if self.tokens_per_s < 0 or self.first_token_delay_s < 0 or self.reasoning_s < 0:
            raise ValueError(f"ModelSpec {self.name!r}: rates and delays must be >= 0")


DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "sim-chat",
        "Simulated chat model: ~60 tokens/s, first token after ~0.3 s.",
    ),
    ModelSpec(
        "sim-fast",
        "Simulated model with no delay at all, for benchmarks (many chunks per write).",
        tokens_per_s=0.0,
        first_token_delay_s=0.0,
    ),
    ModelSpec(
        "sim-reasoner",
        "Simulated reasoning model: streams reasoning_content for ~2.5 s, then the answer.",
        first_token_delay_s=0.5,
        reasoning=True,
        reasoning_s=2.5,
    ),
    ModelSpec(
        "sim-think",
        "Simulated model that writes a <think>...</think> block before its answer.",
        think_tags=True,
        reasoning_s=1.5,
    ),
    ModelSpec(
        "sim-tools",
        "Simulated model that answers with two parallel tool calls.",
        tools=True,
    ),
    ModelSpec(
        "sim-flaky",
        "Simulated model that answers 429 (Retry-After: 1) to every other request for a prompt.",
        fault=FLAKY,
    ),
    ModelSpec(
        "sim-drop",
        "Simulated model whose connection drops after ~20 tokens, without [DONE].",
        fault=DROP,
        fault_after=20,
    ),
    ModelSpec(
        "sim-stall",
        "Simulated model that sends ~10 tokens, then goes silent until the client leaves.",
        fault=STALL,
        fault_after=10,
    ),
)


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Time scaling and model table. ``speed`` multiplies token rates; the delay scale
    multiplies first-token delays (0 removes them)."""

    speed: float = 1.0
    first_token_delay_scale: float = 1.0
    models: tuple[ModelSpec, ...] = DEFAULT_MODELS
    api_key: str | None = None
    retry_after_s: int = 1  # what sim-flaky asks the client to wait

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ValueError("SimulatorConfig 'speed' must be > 0.")
        if self.first_token_delay_scale < 0:
            raise ValueError("SimulatorConfig 'first_token_delay_scale' must be >= 0.")
        if len({m.name for m in self.models}) != len(self.models):
            raise ValueError("SimulatorConfig 'models' has duplicate names.")
