"""First contact with a broken upstream (issue 14): ``/api/models`` says why, the start-up
line says why, ``tokenrelay doctor`` says why and what to do. Real servers on loopback:
a closed port, Python's http.server, a TLS server with a self-signed certificate, and an
upstream that chats but cannot list its models."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support.client import chat_body, read_stream
from support.fault_upstream import FaultUpstream, stall_first, status
from support.gateway import running_gateway
from support.processes import TOKENRELAY, free_port, wait_listening
from support.servers import running_asgi
from support.upstreams import chat_only_upstream, closed_port, plain_web_server, self_signed_files
from tokenrelay.simulator import SimulatorConfig, build_text, create_simulator

SECRET = "sk-upstream-secret-0123456789"
TIMEOUT = 60.0


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        yield session


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_files(tmp_path_factory.mktemp("tls"))


@contextlib.asynccontextmanager
async def tls_simulator(tls_files: tuple[Path, Path]) -> AsyncIterator[str]:
    """The simulator over HTTPS with a certificate nobody trusts by default."""
    cert, key = tls_files
    app = create_simulator(SimulatorConfig(speed=20.0, first_token_delay_scale=0.0))
    async with running_asgi(app, ssl_certfile=str(cert), ssl_keyfile=str(key),
                            http="httptools") as url:
        yield url.replace("http://", "https://")


async def models_of(http: aiohttp.ClientSession, upstream: str, **env: str) -> dict[str, Any]:
    async with running_gateway(TOKENRELAY_UPSTREAM_URL=upstream,
                               TOKENRELAY_UPSTREAM_API_KEY=SECRET, **env) as gw:
        async with http.get(gw.base_url + "/api/models") as resp:
            assert resp.status == 200
            raw = await resp.text()
    assert SECRET not in raw
    data: dict[str, Any] = json.loads(raw)
    return data


async def test_closed_port_says_connection_refused_and_still_offers_the_default_model(
    http: aiohttp.ClientSession,
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    data = await models_of(http, url, TOKENRELAY_DEFAULT_MODEL="my-model")
    problem = data["problem"]
    assert problem["code"] == "connect_refused"
    assert problem["message"] == f"GET {url}/models: connection refused by " \
        f"{url[len('http://'):-len('/v1')]}"
    assert "TOKENRELAY_UPSTREAM_URL" in problem["hint"]
    assert problem["url"] == url and problem["provider"] == "upstream"
    assert [m["id"] for m in data["models"]] == ["my-model"]
    assert data["default"] == "my-model"
    assert data["any_model"] is True


async def test_a_plain_web_server_is_named_as_an_html_page_and_the_hint_says_v1(
    http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    async with plain_web_server(tmp_path) as web:
        data = await models_of(http, web)
    problem = data["problem"]
    assert problem["code"] == "html_page"
    assert problem["message"] == f'GET {web}/models: HTTP 404, an HTML page ("Error response")'
    assert "/v1" in problem["hint"]
    assert data["models"] == [] and data["default"] is None and data["any_model"] is True


async def test_an_untrusted_certificate_is_named_and_the_hint_says_ssl_cert_file(
    http: aiohttp.ClientSession, tls_files: tuple[Path, Path],
) -> None:
    async with tls_simulator(tls_files) as url:
        data = await models_of(http, url + "/v1", TOKENRELAY_DEFAULT_MODEL="sim-fast")
    problem = data["problem"]
    assert problem["code"] == "tls_untrusted"
    assert problem["message"].startswith(f"GET {url}/v1/models: TLS certificate not trusted")
    assert "self-signed" in problem["message"]
    assert "SSL_CERT_FILE" in problem["hint"]
    assert [m["id"] for m in data["models"]] == ["sim-fast"]


async def test_an_upstream_that_cannot_list_still_chats_with_the_default_model(
    http: aiohttp.ClientSession,
) -> None:
    async with running_asgi(chat_only_upstream()) as upstream, running_gateway(
        TOKENRELAY_UPSTREAM_URL=upstream + "/v1", TOKENRELAY_DEFAULT_MODEL="sim-fast",
    ) as gw:
        async with http.get(gw.base_url + "/api/models") as resp:
            data = await resp.json()
        assert data["problem"]["code"] == "html_page"
        assert data["problem"]["message"] == (f"GET {upstream}/v1/models: HTTP 404, an HTML page "
                                              '("404 Not Found")')
        assert data["default"] == "sim-fast"
        async with http.post(gw.base_url + "/api/chat",
                             json=chat_body("hi", model=data["default"])) as resp:
            assert resp.status == 200
            stream = await read_stream(resp)
    assert stream.terminal[0].event == "done"
    assert stream.text == "".join(build_text("sim-fast", [{"role": "user", "content": "hi"}]))


async def test_a_working_upstream_lists_its_models_without_a_problem(
    http: aiohttp.ClientSession,
) -> None:
    app = create_simulator(SimulatorConfig(first_token_delay_scale=0.0))
    async with running_asgi(app) as upstream:
        data = await models_of(http, upstream + "/v1")
    assert "problem" not in data
    assert "sim-chat" in {m["id"] for m in data["models"]}


# ------------------------------------------------------------------ processes


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TOKENRELAY_") and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    return {**env, "TOKENRELAY_DATABASE_URL": "none", **extra}


async def run(*args: str, **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(TOKENRELAY), *args, env=_env(**env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def rows(out: str) -> dict[str, tuple[str, str]]:
    """{check: (result, detail)} from the doctor's table."""
    found = {}
    for line in out.splitlines()[1:]:
        parts = line.split(None, 3)
        if len(parts) >= 3 and parts[1] in ("resolve", "connect", "tls", "models", "completion"):
            found[parts[1]] = (parts[2], parts[3] if len(parts) > 3 else "")
    return found


@contextlib.asynccontextmanager
async def simulate_process() -> AsyncIterator[str]:
    """``tokenrelay simulate`` as its own process."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        str(TOKENRELAY), "simulate", "--port", str(port), "--speed", "20", env=_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_listening(port, "tokenrelay simulate", tries=400)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        await proc.wait()


async def test_doctor_on_a_working_upstream_reports_every_check_and_exits_0() -> None:
    async with simulate_process() as url:
        status, out, err = await run("doctor", "--url", url)
    assert status == 0, out + err
    table = rows(out)
    assert table["resolve"][0] == "ok" and table["connect"][0] == "ok"
    assert table["tls"] == ("-", "plain http")
    assert table["models"][0] == "ok" and "8 models (sim-chat" in table["models"][1]
    result, detail = table["completion"]
    assert result == "ok"
    for part in ("model sim-chat", "TTFT", "tokens/s", "[DONE] yes", "usage yes",
                 "finish_reason length"):
        assert part in detail
    assert out.rstrip().endswith("the provider is usable")


async def test_doctor_on_a_closed_port_fails_with_one_actionable_line() -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    status, out, _ = await run("doctor", "--url", url)
    assert status == 1
    table = rows(out)
    assert table["connect"][0] == "FAIL"
    assert table["models"][0] == "-" and table["completion"][0] == "-"
    assert "connection refused by 127.0.0.1" in out
    assert "  -> Nothing listens there" in out
    assert "1 of 1 provider failing: url" in out


async def test_doctor_on_a_plain_web_server_fails_models_and_completion(tmp_path: Path) -> None:
    async with plain_web_server(tmp_path) as web:
        status, out, _ = await run("doctor", "--url", web + "/v1", "--model", "gpt-4o-mini",
                                   TOKENRELAY_UPSTREAM_URL="http://ignored.invalid")
    assert status == 1
    table = rows(out)
    assert table["connect"][0] == "ok"
    assert table["models"] == ("FAIL", f'GET {web}/v1/models: HTTP 404, an HTML page '
                               '("Error response")')
    assert table["completion"][0] == "FAIL" and "HTTP 501" in table["completion"][1]
    assert out.count("  -> ") == 2


async def test_doctor_names_an_untrusted_certificate_and_passes_once_it_is_trusted(
    tls_files: tuple[Path, Path],
) -> None:
    async with tls_simulator(tls_files) as url:
        status, out, _ = await run("doctor", TOKENRELAY_UPSTREAM_URL=url + "/v1",
                                   TOKENRELAY_UPSTREAM_API_KEY=SECRET)
        trusted_status, trusted, _ = await run("doctor", TOKENRELAY_UPSTREAM_URL=url + "/v1",
                                               SSL_CERT_FILE=str(tls_files[0]))
    assert status == 1
    assert rows(out)["tls"][0] == "FAIL"
    assert "TLS certificate not trusted (self-signed certificate)" in out
    assert "-> The server's certificate is not trusted here: point SSL_CERT_FILE" in out
    assert SECRET not in out
    assert trusted_status == 0, trusted
    assert rows(trusted)["tls"][0] == "ok" and "certificate verified, TLSv1" in trusted


async def test_doctor_on_an_upstream_that_only_chats_warns_about_models_and_exits_0() -> None:
    async with running_asgi(chat_only_upstream()) as upstream:
        status, out, _ = await run("doctor", TOKENRELAY_UPSTREAM_URL=upstream + "/v1",
                                   TOKENRELAY_DEFAULT_MODEL="sim-fast")
    assert status == 0, out
    table = rows(out)
    assert table["models"][0] == "warn"
    assert table["completion"][0] == "ok" and "model sim-fast" in table["completion"][1]
    assert "type a model name in the page or set TOKENRELAY_DEFAULT_MODEL" in out


async def test_doctor_with_nothing_configured_checks_the_built_in_simulator() -> None:
    status, out, _ = await run("doctor")
    assert status == 0, out
    assert out.startswith("no upstream configured: checking the built-in simulator")
    assert rows(out)["completion"][0] == "ok"


async def test_doctor_refuses_an_unset_key_variable() -> None:
    status, _, err = await run("doctor", "--url", "http://127.0.0.1:1/v1",
                               "--api-key-env", "NO_SUCH_VARIABLE_SET")
    assert status == 2
    assert "NO_SUCH_VARIABLE_SET" in err


async def test_serve_prints_one_line_per_provider_with_the_real_reason(
    tls_files: tuple[Path, Path],
) -> None:
    port = free_port()
    async with tls_simulator(tls_files) as url:
        proc = await asyncio.create_subprocess_exec(
            str(TOKENRELAY), "serve", "--port", str(port),
            env=_env(TOKENRELAY_UPSTREAM_URL=url + "/v1", TOKENRELAY_UPSTREAM_API_KEY=SECRET),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        lines: list[str] = []
        try:
            async with asyncio.timeout(TIMEOUT):
                while not any("provider 'upstream'" in line for line in lines):
                    raw = await proc.stderr.readline()
                    assert raw, "".join(lines)
                    lines.append(raw.decode())
        finally:
            proc.terminate()
            await proc.wait()
    [line] = [line for line in lines if "provider 'upstream'" in line]
    assert "WARNING" in line
    assert f"provider 'upstream' ({url}/v1): NOT usable: GET {url}/v1/models: TLS certificate " \
        "not trusted (self-signed certificate)" in line
    assert "SSL_CERT_FILE" in line
    assert SECRET not in "".join(lines)


async def test_serve_says_a_working_provider_is_reachable() -> None:
    port = free_port()
    app = create_simulator(SimulatorConfig(first_token_delay_scale=0.0))
    async with running_asgi(app) as upstream:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokenrelay", "serve", "--port", str(port),
            env=_env(TOKENRELAY_UPSTREAM_URL=upstream + "/v1"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        try:
            async with asyncio.timeout(TIMEOUT):
                while b"provider 'upstream'" not in (line := await proc.stderr.readline()):
                    assert line
        finally:
            proc.terminate()
            await proc.wait()
    assert f"provider 'upstream' ({upstream}/v1): reachable, 8 models (sim-chat".encode() in line


# ------------------------------------------------------------------ the probe itself


async def probe(base_url: str, timeout: float = 5.0, api_key: str | None = None) -> Any:
    from tokenrelay.config import Provider, load_settings
    from tokenrelay.diagnose import probe_models
    from tokenrelay.httpclient import Pool
    from tokenrelay.upstream import UpstreamClient

    env = {"TOKENRELAY_UPSTREAM_URL": base_url, "TOKENRELAY_DATABASE_URL": "none"}
    if api_key:
        env["TOKENRELAY_UPSTREAM_API_KEY"] = api_key
    settings = load_settings(environ=env)
    pool = Pool()
    try:
        provider: Provider = settings.providers["upstream"]
        return await probe_models(UpstreamClient(settings, pool), provider, timeout)
    finally:
        await pool.aclose()


async def test_a_refused_key_is_named_with_the_variable_to_set_and_never_shown() -> None:
    async with FaultUpstream() as upstream:
        upstream.script(status(401, body={"error": {"message": f"bad key {SECRET}"}}))
        result = await probe(upstream.base_url, api_key=SECRET)
    assert result.problem.code == "unauthorized"
    assert "HTTP 401" in result.problem.message
    assert "TOKENRELAY_UPSTREAM_API_KEY" in result.problem.hint
    assert SECRET not in result.problem.message + result.problem.hint


async def test_a_json_404_without_v1_suggests_the_v1_url() -> None:
    async with FaultUpstream() as upstream:
        base = upstream.base_url.removesuffix("/v1")
        upstream.script(status(404))
        result = await probe(base)
    assert result.problem.code == "not_found"
    assert result.problem.message == f"GET {base}/models: HTTP 404"
    assert f"try {base}/v1 in TOKENRELAY_UPSTREAM_URL" in result.problem.hint


async def test_a_server_that_never_answers_is_a_timeout_within_the_budget() -> None:
    async with FaultUpstream() as upstream:
        upstream.script(stall_first())
        result = await probe(upstream.base_url, timeout=0.5)
    assert result.problem.code == "timeout"
    assert result.problem.message == f"GET {upstream.base_url}/models: no answer within 0.5 s"
    assert result.elapsed_s < TIMEOUT


async def test_a_200_that_is_not_a_model_list_is_named() -> None:
    async with FaultUpstream() as upstream:
        upstream.script(status(200, body="<html><title>Welcome to nginx!</title></html>",
                               headers={"Content-Type": "text/html"}))
        result = await probe(upstream.base_url)
    assert result.problem.code == "html_page"
    assert 'an HTML page ("Welcome to nginx!")' in result.problem.message


def test_urls_are_shown_without_user_info_or_query() -> None:
    from tokenrelay.diagnose import safe_url

    assert safe_url("https://user:pw@host.example:8443/v1?key=abc#x") == \
        "https://host.example:8443/v1"
    assert safe_url("http://[::1]:9000/v1") == "http://[::1]:9000/v1"
    assert safe_url("not a url") == "(an invalid URL)"


async def test_a_redirect_is_named_and_not_followed() -> None:
    async with FaultUpstream() as upstream:
        upstream.script(status(301, body="",
                               headers={"Location": "https://elsewhere.example/v1/models"}))
        result = await probe(upstream.base_url)
    assert result.problem.code == "redirect"
    where = f"GET {upstream.base_url}/models"
    assert result.problem.message.startswith(f"{where}: HTTP 301 (a redirect")
    assert "does not follow redirects" in result.problem.hint
    assert len(upstream.requests) == 1
