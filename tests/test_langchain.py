"""LangChain's ``ChatOpenAI(use_responses_api=True)`` against tokenrelay's ``/v1/responses``."""

from __future__ import annotations

from langchain_core.messages import AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from tokenrelay.simulator import build_text

QUESTION = "What is SSE?"
ASKED = [{"role": "user", "content": QUESTION}]


def chat_model(gateway, model: str) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=gateway.base_url + "/v1", api_key="unused",
                      use_responses_api=True, max_retries=0)


@tool
def get_weather(city: str) -> str:
    """Current weather of a city."""
    return "sunny"


async def test_langchain_invokes_and_streams_over_the_responses_api(gateway, simulator):
    sim, _ = simulator
    llm = chat_model(gateway, "sim-chat")
    expected = "".join(build_text("sim-chat", ASKED))
    answer = await llm.ainvoke(QUESTION)
    assert answer.text == expected
    assert answer.response_metadata["id"].startswith("resp_")
    assert answer.usage_metadata["output_tokens"] > 0
    requests = sim.stats.requests

    chunks = [chunk async for chunk in llm.astream(QUESTION)]
    assert sim.stats.requests == requests + 1
    assert len(chunks) > 3  # streamed, not one block
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert isinstance(merged, AIMessageChunk)
    assert merged.text == expected


async def test_langchain_gets_tool_calls_and_continues_with_their_results(gateway):
    llm = chat_model(gateway, "sim-tools").bind_tools([get_weather])
    asked = await llm.ainvoke("Weather in two cities?")
    assert [c["name"] for c in asked.tool_calls] == ["get_weather", "get_weather"]
    assert all(set(c["args"]) == {"city"} for c in asked.tool_calls)
    results = [get_weather.invoke(call) for call in asked.tool_calls]  # ToolMessages
    answer = await llm.ainvoke(["Weather in two cities?", asked, *results])
    assert answer.text and not answer.tool_calls
