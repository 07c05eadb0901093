"""Node clients against tokenrelay over loopback: the ``openai`` npm SDK (chat completions
and the Responses API, background resume included) and the Vercel AI SDK's default
``createOpenAI`` provider with ``streamText`` (it speaks the Responses API).

The packages are installed by :mod:`support.node_clients` (pinned, cached per machine).
"""

from __future__ import annotations

import pytest

from support.node_clients import run_script
from tokenrelay.simulator import build_reasoning, build_text

ASKED = [{"role": "user", "content": "What is SSE?"}]
# The first test on a machine installs the packages with npm (each script still has its
# own 120 s budget in run_script).
pytestmark = pytest.mark.timeout(600)


async def test_the_openai_npm_sdk_streams_chat_completions_and_responses(gateway):
    result = await run_script("openai_sdk.cjs", gateway.base_url + "/v1", "sim-chat")
    expected = "".join(build_text("sim-chat", ASKED))
    assert result["chat"]["text"] == expected and result["chat"]["finish"] == "stop"
    assert result["chat"]["usage"]["completion_tokens"] > 0
    responses = result["responses"]
    assert responses["text"] == responses["output_text"] == expected
    assert responses["status"] == "completed"
    assert responses["types"][:2] == ["response.created", "response.in_progress"]
    assert responses["types"][-1] == "response.completed"
    assert responses["numbers"] == list(range(len(responses["numbers"])))
    background = result["background"]
    assert background["numbers"] == list(range(len(background["numbers"])))  # exactly once
    assert background["last"] == "response.completed"
    assert background["text"] == "".join(build_text("sim-chat", ASKED, length=60))


async def test_the_vercel_ai_sdk_default_provider_streams_text(gateway):
    result = await run_script("vercel_ai.cjs", gateway.base_url + "/v1", "sim-chat")
    assert result["errors"] == []
    assert result["text"] == "".join(build_text("sim-chat", ASKED))
    assert result["finishReason"] == "stop"
    assert result["usage"]["outputTokens"] > 0
    assert result["responseId"].startswith("resp_") and result["modelId"] == "sim-chat"


async def test_the_vercel_ai_sdk_gets_reasoning_and_tool_calls(gateway):
    result = await run_script("vercel_ai.cjs", gateway.base_url + "/v1", "sim-reasoner")
    assert result["errors"] == []
    assert result["reasoning"] == "".join(build_reasoning("sim-reasoner", ASKED))
    assert result["text"] == "".join(build_text("sim-reasoner", ASKED))

    result = await run_script("vercel_ai.cjs", gateway.base_url + "/v1", "sim-tools", "tools")
    assert result["errors"] == []
    assert result["finishReason"] == "tool-calls"
    assert [c["name"] for c in result["toolCalls"]] == ["get_weather", "get_weather"]
    assert all(set(c["input"]) == {"city"} for c in result["toolCalls"])


async def test_the_vercel_ai_sdk_continues_a_conversation(gateway, simulator):
    sim, _ = simulator
    result = await run_script("vercel_ai.cjs", gateway.base_url + "/v1", "sim-chat",
                              "multiturn")
    assert result["errors"] == []
    assert result["first"] == "".join(build_text("sim-chat", ASKED))
    sent = sim.last_request_body["messages"]
    assert sent == [*ASKED, {"role": "assistant", "content": result["first"]},
                    {"role": "user", "content": "And tomorrow?"}]
    assert result["second"] == "".join(build_text("sim-chat", sent))
    assert result["finishReason"] == "stop"


async def test_the_vercel_ai_sdk_sees_a_broken_answer_as_an_error_with_its_partial_text(gateway):
    result = await run_script("vercel_ai.cjs", gateway.base_url + "/v1", "sim-drop")
    assert result["finishReason"] == "error" and result["errors"]  # response.failed
    assert result["text"] and "".join(build_text("sim-drop", ASKED)).startswith(result["text"])
