"""Upstream failures a person must act on, through the real gateway against the scripted
fault upstream: one short sentence that says what to change, and no retry where waiting
cannot help (counted at the upstream)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from support.client import chat_body, read_stream
from support.fault_upstream import FaultUpstream, status
from support.gateway import running_gateway

TWO_TRIES = {"TOKENRELAY_RETRY_MAX_ATTEMPTS": "2", "TOKENRELAY_RETRY_BASE_DELAY_S": "0.01",
             "TOKENRELAY_RETRY_MAX_DELAY_S": "0.05"}


@pytest.fixture
async def up() -> AsyncIterator[FaultUpstream]:
    async with FaultUpstream() as server:
        yield server


async def ask(http, base_url: str, **env: str):  # type: ignore[no-untyped-def]
    """One /api/chat answer from a gateway in front of ``base_url``."""
    async with running_gateway(TOKENRELAY_UPSTREAM_URL=base_url, **TWO_TRIES, **env) as gw:
        async with http.post(gw.base_url + "/api/chat", json=chat_body("hi", "m")) as resp:
            return await read_stream(resp)


def error_of(stream) -> dict:  # type: ignore[no-untyped-def]
    end = stream.events[-1]
    assert end.event == "error", end
    return end.data["error"]  # type: ignore[no-any-return]


# -- error pages become one sentence ---------------------------------------------------------


async def test_html_error_page_becomes_its_title(up, http):
    page = ("<!DOCTYPE html>\n<html><head><meta charset=utf-8>\n<title>\n  Gateway   time-out"
            " &amp; more\n</title><style>body{color:red}</style></head>\n<body><h1>504</h1>"
            + "<p>filler</p>" * 500 + "</body></html>")
    up.script(status(504, page))
    error = error_of(await ask(http, up.base_url))
    assert error["message"] == "upstream answered HTTP 504: Gateway time-out & more"


async def test_html_page_without_title_gives_its_first_text_cut_short(up, http):
    page = ("<html><body><script>var x = '<p>no</p>';</script><h1>Service\n\n unavailable</h1>"
            "<p>" + "very long explanation " * 40 + "</p></body></html>")
    up.script(status(503, page))
    message = error_of(await ask(http, up.base_url))["message"]
    assert message.startswith("upstream answered HTTP 503: Service unavailable very long")
    assert "<" not in message and "  " not in message and "var x" not in message
    assert len(message) <= len("upstream answered HTTP 503: ") + 200
    assert message.endswith("…")


async def test_status_is_never_said_twice(up, http):
    up.script(status(502, b""))
    message = error_of(await ask(http, up.base_url))["message"]
    assert message == "upstream answered HTTP 502 Bad Gateway"


async def test_404_names_the_url_tried_and_hints_at_a_missing_v1(up, http):
    up.script(status(404, "404 page not found"))
    base = up.base_url.removesuffix("/v1")
    stream = await ask(http, base, TOKENRELAY_UPSTREAM_API_KEY="sk-secret-key-123456")
    error = error_of(stream)
    assert error["message"] == (
        f"upstream answered HTTP 404: page not found for POST {base}/chat/completions: "
        f"the base URL may lack /v1 (try base_url = {base}/v1)")
    assert error["retryable"] is False and not stream.named("retry")
    assert len(up.requests) == 1
    assert "sk-secret" not in stream.raw.decode()


async def test_404_with_v1_keeps_the_providers_words(up, http):
    up.script(status(404, {"error": {"message": "The model `m` does not exist"}}))
    message = error_of(await ask(http, up.base_url))["message"]
    assert message == (f"upstream answered HTTP 404: The model `m` does not exist for POST "
                       f"{up.base_url}/chat/completions: check the base URL and the model name")


@pytest.mark.parametrize("code", [301, 302, 307, 308])
async def test_redirect_names_the_location_and_is_not_followed(up, http, code):
    location = "https://api.example.com/v1/chat/completions?from=old"
    up.script(status(code, b"", headers={"Location": location}))
    stream = await ask(http, up.base_url)
    error = error_of(stream)
    assert error["message"] == (
        f"upstream redirects POST {up.base_url}/chat/completions to "
        f"https://api.example.com/v1/chat/completions (HTTP {code}, not followed): "
        "set base_url to https://api.example.com/v1")
    assert error["retryable"] is False and len(up.requests) == 1


# -- what waiting cannot heal is not retried -------------------------------------------------


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (401, "check the provider's API key"),
        (403, "may lack access"),
        (405, "OpenAI-compatible API"),
        (501, "HTTP 501: simulated 501"),
    ],
)
async def test_failures_that_cannot_heal_are_tried_once(up, http, code, words):
    up.script(status(code))
    stream = await ask(http, up.base_url)
    error = error_of(stream)
    assert words in error["message"]
    assert error["retryable"] is False and not stream.named("retry")
    assert len(up.requests) == 1


@pytest.mark.parametrize("code", [429, 500, 502, 503])
async def test_failures_that_can_heal_are_still_retried(up, http, code):
    up.script(status(code))
    stream = await ask(http, up.base_url)
    assert error_of(stream)["retryable"] is True
    assert len(stream.named("retry")) == 1 and len(up.requests) == 2


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is not installed: run scripts/system-deps.sh")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30)
    return cert, key


async def test_untrusted_tls_certificate_is_not_retried(self_signed, http):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed)
    async with FaultUpstream(tls=context) as tls_up:
        stream = await ask(http, tls_up.base_url)
    error = error_of(stream)
    assert error["message"].startswith("TLS certificate not trusted (self")
    assert error["message"].endswith("; trust a private CA with SSL_CERT_FILE")
    assert error["retryable"] is False and not stream.named("retry")
    assert tls_up.requests == []


async def test_malformed_base_url_is_not_retried(http):
    stream = await ask(http, "http://127.0.0.1:notaport/v1")
    error = error_of(stream)
    assert "bad port" in error["message"]
    assert error["retryable"] is False and not stream.named("retry")


# -- a JSON completion answered to stream: true ----------------------------------------------


COMPLETION = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "served-model",
    "choices": [{
        "index": 0, "finish_reason": "tool_calls",
        "message": {
            "role": "assistant", "content": "Let me look.", "reasoning_content": "Think first.",
            "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
    }],
    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
}


async def test_json_completion_to_a_stream_request_is_relayed_whole_on_api_chat(up, http):
    up.script(status(200, COMPLETION))
    stream = await ask(http, up.base_url)
    assert up.requests[0].json["stream"] is True
    assert stream.text == "Let me look." and stream.reasoning == "Think first."
    calls = [e.data for e in stream.named("tool_call")]
    assert [(c["index"], c["id"], c["name"], c["arguments"]) for c in calls] == [
        (0, "call_1", "get_weather", "{\"city\": \"Oslo\"}"), (1, "call_2", "get_time", "{}")]
    done = stream.events[-1].data
    assert done["state"] == "complete" and done["finish_reason"] == "tool_calls"
    assert done["usage"]["completion_tokens"] == 7 and done["usage"]["prompt_tokens"] == 11
    assert not stream.named("retry") and len(up.requests) == 1


async def test_json_completion_to_a_stream_request_is_relayed_whole_on_v1(up):
    up.script(status(200, COMPLETION))
    async with running_gateway(TOKENRELAY_UPSTREAM_URL=up.base_url) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0)
        whole = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
        chunks = [c async for c in await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})]
        await sdk.close()
    message = whole.choices[0].message
    assert message.content == "Let me look."
    assert [c.function.name for c in message.tool_calls or []] == ["get_weather", "get_time"]
    assert whole.choices[0].finish_reason == "tool_calls"
    assert whole.usage is not None and whole.usage.total_tokens == 18
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Let me look."
    assert [c.choices[0].finish_reason for c in chunks if c.choices and
            c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
    assert len(up.requests) == 2


async def test_json_error_object_with_200_is_the_providers_error(up, http):
    up.script(status(200, {"error": {"message": "context length exceeded", "code": "400"}}))
    error = error_of(await ask(http, up.base_url))
    assert error["message"] == "context length exceeded"


async def test_web_page_answered_200_is_not_taken_for_a_stream(up, http):
    up.script(status(200, "<html><head><title>Welcome to nginx!</title></head></html>",
                     headers={"Content-Type": "text/html"}))
    stream = await ask(http, up.base_url)
    error = error_of(stream)
    assert error["message"] == (
        f"upstream answered a web page (Welcome to nginx!) instead of an event stream to "
        f"POST {up.base_url}/chat/completions: is the base URL an OpenAI-compatible API?")
    assert error["retryable"] is False and len(up.requests) == 1
