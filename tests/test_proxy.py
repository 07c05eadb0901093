"""Upstream calls through a real HTTP proxy (PyPI's proxy.py, a subprocess on loopback).

In front of a plain-HTTP test upstream (absolute-form requests: the proxy adds ``Via``)
and of a TLS one whose certificate comes from a test CA handed over by SSL_CERT_FILE
(a ``CONNECT`` tunnel; the proxy logs it when it closes). The proxy settings come from the
environment or the config file, as a user would write them, through ``load_settings``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from support.client import chat_body, read_stream
from support.fault_upstream import FaultUpstream, slow
from support.gateway import running_gateway
from support.http_proxy import HttpProxy, running_proxy
from support.processes import Instance, Launcher
from tokenrelay.config import _no_proxy_match, load_settings
from tokenrelay.errors import ConfigError

FAST_RETRY = {"TOKENRELAY_RETRY_BASE_DELAY_S": "0.01", "TOKENRELAY_RETRY_MAX_DELAY_S": "0.05"}
USER, PASSWORD = "relay user", "p@ss:wörd"  # percent-encoded in the URL, decoded for the proxy
USERINFO = "relay%20user:p%40ss%3Aw%C3%B6rd"


# -- certificates: a test CA and a leaf for "localhost" only ---------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed CA and a certificate it signed for DNS name ``localhost`` (no IP)."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is not installed: run scripts/system-deps.sh")
    d = tmp_path_factory.mktemp("pki")
    files = {n: d / n for n in ("ca.pem", "ca.key", "leaf.pem", "leaf.key", "leaf.csr")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    run("req", "-x509", *ec, "-keyout", str(files["ca.key"]), "-out", str(files["ca.pem"]),
        "-days", "2", "-subj", "/CN=tokenrelay test CA")
    run("req", *ec, "-keyout", str(files["leaf.key"]), "-out", str(files["leaf.csr"]),
        "-subj", "/CN=localhost")
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost\n")
    run("x509", "-req", "-in", str(files["leaf.csr"]), "-CA", str(files["ca.pem"]),
        "-CAkey", str(files["ca.key"]), "-CAcreateserial", "-out", str(files["leaf.pem"]),
        "-days", "2", "-extfile", str(ext))
    return files


def server_tls(pki: dict[str, Path]) -> object:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["leaf.pem"], pki["leaf.key"])
    return context


@pytest.fixture
def trust_ca(pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """The gateway's TLS (OpenSSL's default paths) trusts the test CA, as a user would
    arrange with SSL_CERT_FILE."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki["ca.pem"]))
    return pki["ca.pem"]


@pytest.fixture
async def tls_upstream(pki: dict[str, Path]) -> AsyncIterator[FaultUpstream]:
    async with FaultUpstream(tls=server_tls(pki), host="localhost") as up:  # type: ignore[arg-type]
        yield up


@pytest.fixture
async def plain_upstream() -> AsyncIterator[FaultUpstream]:
    async with FaultUpstream() as up:
        yield up


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[HttpProxy]:
    async with running_proxy(tmp_path) as p:
        yield p


async def chat(gw, http, content: str = "hi"):  # type: ignore[no-untyped-def]
    base = gw.url if isinstance(gw, Instance) else gw.base_url
    async with http.post(base + "/api/chat", json=chat_body(content, "any")) as resp:
        assert resp.status == 200
        return await read_stream(resp)


def config_file(tmp_path: Path, base_url: str, proxy: str | None) -> str:
    lines = ["[providers.corp]", f'base_url = "{base_url}"']
    if proxy is not None:
        lines.append(f'proxy = "{proxy}"')
    lines += ["[models.any]", 'provider = "corp"']
    path = tmp_path / "tokenrelay.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# -- through the proxy -----------------------------------------------------------------------


async def test_http_upstream_is_reached_in_absolute_form_through_http_proxy(
    plain_upstream, proxy, http
):
    async with running_gateway(TOKENRELAY_UPSTREAM_URL=plain_upstream.base_url,
                               http_proxy=proxy.url()) as gw:
        stream = await chat(gw, http)
    assert stream.events[-1].data["state"] == "complete"
    assert stream.text == "Hello, world!"
    seen = plain_upstream.requests[0]
    assert seen.headers.get("via", "").startswith("1.1 proxy.py")  # forwarded by the proxy
    assert seen.path == "/v1/chat/completions"  # the proxy turned absolute-form back
    assert "proxy-authorization" not in seen.headers


async def test_https_upstream_is_tunnelled_and_verified_against_its_own_name(
    tls_upstream, proxy, trust_ca, http
):
    assert tls_upstream.base_url.startswith("https://localhost:")
    async with running_gateway(TOKENRELAY_UPSTREAM_URL=tls_upstream.base_url,
                               HTTPS_PROXY=proxy.url()) as gw:
        first = await chat(gw, http)
        second = await chat(gw, http)
    assert first.text == second.text == "Hello, world!"
    assert tls_upstream.connections == 1  # one tunnel, kept alive for the second answer
    # The gateway closed its pool: the proxy logs the tunnel it carried.
    await proxy.logged(f"CONNECT localhost:{tls_upstream.port}")


async def test_tls_through_the_tunnel_checks_the_upstream_name_not_the_proxy(
    tls_upstream, proxy, trust_ca, http
):
    # Same server, same CA, but asked for as 127.0.0.1: the certificate names only
    # localhost, so the verification (inside the tunnel) must fail, and not be retried.
    url = tls_upstream.base_url.replace("localhost", "127.0.0.1")
    async with running_gateway(TOKENRELAY_UPSTREAM_URL=url, HTTPS_PROXY=proxy.url(),
                               **FAST_RETRY) as gw:
        stream = await chat(gw, http)
    error = stream.events[-1].data["error"]
    assert error["message"].startswith("TLS certificate not trusted (IP address mismatch")
    assert error["message"].endswith(f"through proxy {proxy.url()}: if it inspects TLS, "
                                     "trust its CA with SSL_CERT_FILE")
    assert error["retryable"] is False and not stream.named("retry")
    assert tls_upstream.requests == []


async def test_https_proxy_speaks_tls_to_the_proxy_and_through_it(
    tls_upstream, pki, trust_ca, tmp_path, http
):
    async with running_proxy(tmp_path, tls=(pki["leaf.pem"], pki["leaf.key"]),
                             host="localhost") as tls_proxy:
        assert tls_proxy.url().startswith("https://localhost:")
        async with running_gateway(TOKENRELAY_UPSTREAM_URL=tls_upstream.base_url,
                                   HTTPS_PROXY=tls_proxy.url()) as gw:
            stream = await chat(gw, http)
        assert stream.text == "Hello, world!"
        await tls_proxy.logged(f"CONNECT localhost:{tls_upstream.port}")


async def test_stop_through_the_proxy_closes_the_upstream_connection(
    tls_upstream, proxy, trust_ca, http
):
    tls_upstream.script(slow([f"t{i} " for i in range(200)], interval=0.05))
    async with running_gateway(TOKENRELAY_UPSTREAM_URL=tls_upstream.base_url,
                               HTTPS_PROXY=proxy.url()) as gw:
        async with http.post(gw.base_url + "/api/chat", json=chat_body("x", "any")) as resp:
            head = await read_stream(resp, stop_after=2)  # start, then a first token
            assert head.text
            stream_id = head.events[0].data["stream_id"]
            async with http.post(f"{gw.base_url}/api/streams/{stream_id}/cancel") as cancel:
                assert cancel.status in (200, 202)
            rest = await read_stream(resp)
        assert rest.events[-1].data["state"] == "cancelled"
        # Closing the tunnel's connection reached the upstream through the proxy.
        await asyncio.wait_for(tls_upstream.wait_client_closed(1), 20)
        await proxy.logged(f"CONNECT localhost:{tls_upstream.port}")  # the tunnel ended


async def test_serve_process_tunnels_through_an_https_proxy_and_logs_it(
    tls_upstream, pki, tmp_path, http
):
    """The real ``tokenrelay serve`` (uvloop: TLS to the proxy, then TLS inside it), with
    the proxy and the CA given through the environment as a user would."""
    async with running_proxy(tmp_path, tls=(pki["leaf.pem"], pki["leaf.key"]),
                             basic_auth=f"{USER}:{PASSWORD}", host="localhost") as tls_proxy:
        inherited = {k: v for k, v in os.environ.items()  # the machine's own proxies out
                     if not k.lower().endswith("_proxy") and not k.startswith("TOKENRELAY_")}
        env = {**inherited, "SSL_CERT_FILE": str(pki["ca.pem"]),
               "TOKENRELAY_UPSTREAM_URL": tls_upstream.base_url,
               "HTTPS_PROXY": tls_proxy.url(USERINFO),
               "TOKENRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}"}
        launcher = Launcher(env, tmp_path, http)
        try:
            (instance,) = await launcher.start("proxied")
            stream = await chat(instance, http)
        finally:
            await launcher.aclose()
        assert stream.text == "Hello, world!"
        await tls_proxy.logged(f"CONNECT localhost:{tls_upstream.port}")
    log = instance.log.read_text()
    assert (f"provider 'upstream' goes through proxy https://relay%20user:***@localhost:"
            f"{tls_proxy.port} (from HTTPS_PROXY)") in log
    assert "p%40ss" not in log and PASSWORD not in log


# -- bypass and overrides --------------------------------------------------------------------


async def test_no_proxy_sends_matching_hosts_direct(tls_upstream, trust_ca, refused_port, http):
    dead = f"http://127.0.0.1:{refused_port}"  # would fail every request sent through it
    no_proxy = f"example.com, .localhost:{tls_upstream.port}"
    async with running_gateway(TOKENRELAY_UPSTREAM_URL=tls_upstream.base_url,
                               HTTPS_PROXY=dead, NO_PROXY=no_proxy) as gw:
        stream = await chat(gw, http)
    assert stream.text == "Hello, world!"


async def test_provider_proxy_empty_overrides_the_environment(
    tls_upstream, trust_ca, refused_port, tmp_path, http
):
    path = config_file(tmp_path, tls_upstream.base_url, "")
    dead = f"http://127.0.0.1:{refused_port}"
    async with running_gateway(TOKENRELAY_CONFIG=path, HTTPS_PROXY=dead, ALL_PROXY=dead) as gw:
        assert gw.settings.providers["corp"].proxy is None
        stream = await chat(gw, http)
    assert stream.text == "Hello, world!"


async def test_provider_proxy_wins_over_no_proxy(plain_upstream, proxy, tmp_path, http):
    path = config_file(tmp_path, plain_upstream.base_url, proxy.url())
    async with running_gateway(TOKENRELAY_CONFIG=path, NO_PROXY="*") as gw:
        stream = await chat(gw, http)
    assert stream.text == "Hello, world!"
    assert plain_upstream.requests[0].headers.get("via", "").startswith("1.1 proxy.py")


# -- authentication and failures -------------------------------------------------------------


async def test_proxy_basic_auth_with_percent_encoded_credentials(
    tls_upstream, plain_upstream, trust_ca, tmp_path, http
):
    async with running_proxy(tmp_path, basic_auth=f"{USER}:{PASSWORD}") as auth_proxy:
        url = auth_proxy.url(USERINFO)
        async with running_gateway(TOKENRELAY_UPSTREAM_URL=tls_upstream.base_url,
                                   HTTPS_PROXY=url) as gw:
            tunnelled = await chat(gw, http)
        async with running_gateway(TOKENRELAY_UPSTREAM_URL=plain_upstream.base_url,
                                   HTTP_PROXY=url) as gw:
            forwarded = await chat(gw, http)
        await auth_proxy.logged(f"CONNECT localhost:{tls_upstream.port}")
    assert tunnelled.text == forwarded.text == "Hello, world!"
    assert plain_upstream.requests[0].headers.get("via", "").startswith("1.1 proxy.py")
    assert "proxy-authorization" not in plain_upstream.requests[0].headers  # not passed on


@pytest.mark.parametrize("userinfo", ["", "relay%20user:wrong-password"])
async def test_proxy_407_is_a_clear_error_not_retried(
    tls_upstream, plain_upstream, tmp_path, http, userinfo, trust_ca
):
    async with running_proxy(tmp_path, basic_auth=f"{USER}:{PASSWORD}") as auth_proxy:
        url = auth_proxy.url(userinfo)
        shown = auth_proxy.url("relay%20user:***" if userinfo else "")
        for upstream, var in ((tls_upstream, "HTTPS_PROXY"), (plain_upstream, "HTTP_PROXY")):
            env = {"TOKENRELAY_UPSTREAM_URL": upstream.base_url, var: url, **FAST_RETRY}
            async with running_gateway(**env) as gw:
                stream = await chat(gw, http)
            error = stream.events[-1].data["error"]
            assert f"proxy {shown} wants authentication" in error["message"], var
            assert "407" in error["message"]
            assert "wrong-password" not in stream.raw.decode()
            assert error["retryable"] is False and not stream.named("retry"), var
            assert upstream.requests == []


async def test_refused_proxy_is_named_without_its_password(
    plain_upstream, refused_port, http, caplog
):
    url = f"http://relay:s3cret-proxy-pw@127.0.0.1:{refused_port}"
    env = {"TOKENRELAY_UPSTREAM_URL": plain_upstream.base_url, "http_proxy": url,
           "TOKENRELAY_RETRY_MAX_ATTEMPTS": "2", **FAST_RETRY}
    with caplog.at_level("INFO", logger="tokenrelay"):
        async with running_gateway(**env) as gw:
            stream = await chat(gw, http)
    error = stream.events[-1].data["error"]
    assert error["code"] == "upstream_unavailable"
    assert f"cannot connect to proxy http://relay:***@127.0.0.1:{refused_port}" in error["message"]
    assert [e.data["reason"] for e in stream.named("retry")] == ["upstream_unavailable"]
    assert "s3cret-proxy-pw" not in stream.raw.decode()
    # The start-up log says which way the provider goes, without the password.
    assert f"provider 'upstream' goes through proxy http://relay:***@127.0.0.1:{refused_port} " \
           "(from http_proxy)" in caplog.text
    assert "s3cret-proxy-pw" not in caplog.text
    assert plain_upstream.requests == []


# -- configuration ---------------------------------------------------------------------------


def env_proxy(base_url: str, **env: str) -> tuple[str | None, str]:
    settings = load_settings(environ={"TOKENRELAY_UPSTREAM_URL": base_url, **env})
    provider = settings.providers["upstream"]
    return provider.proxy, provider.proxy_from


def test_environment_proxy_per_scheme_lowercase_first_then_all_proxy() -> None:
    assert env_proxy("https://api.example.com/v1", https_proxy="http://a:1",
                     HTTPS_PROXY="http://b:2") == ("http://a:1", "https_proxy")
    assert env_proxy("https://api.example.com/v1", HTTP_PROXY="http://b:2") == (None, "")
    assert env_proxy("http://api.example.com/v1", HTTP_PROXY="b:2") == ("http://b:2", "HTTP_PROXY")
    assert env_proxy("https://api.example.com/v1", all_proxy="http://c:3",
                     ALL_PROXY="http://d:4") == ("http://c:3", "all_proxy")
    assert env_proxy("https://api.example.com/v1", HTTPS_PROXY="",
                     ALL_PROXY="http://d:4") == ("http://d:4", "ALL_PROXY")
    assert env_proxy("https://api.example.com/v1", HTTPS_PROXY="http://b:2",
                     no_proxy="other.com", NO_PROXY="*") == ("http://b:2", "HTTPS_PROXY")


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "bypass"),
    [
        ("api.example.com", 443, "*", True),
        ("api.example.com", 443, "example.com", True),
        ("example.com", 443, "example.com", True),
        ("notexample.com", 443, "example.com", False),
        ("api.example.com", 443, ".example.com", True),
        ("api.example.com", 443, "*.example.com", True),
        ("API.Example.COM", 443, " foo.org ,EXAMPLE.com", True),
        ("api.example.com", 443, "example.com:8443", False),
        ("api.example.com", 8443, "example.com:8443", True),
        ("10.1.2.3", 443, "10.0.0.0/8", True),
        ("11.1.2.3", 443, "10.0.0.0/8", False),
        ("127.0.0.1", 80, "127.0.0.1", True),
        ("::1", 443, "[::1]:443", True),
        ("::1", 443, "::1", True),
        ("127.0.0.1", 80, "localhost", False),
        ("api.example.com", 443, "", False),
    ],
)
def test_no_proxy_entries(host: str, port: int, no_proxy: str, bypass: bool) -> None:
    assert _no_proxy_match(host, port, no_proxy) is bypass


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("socks5://127.0.0.1:1080", "SOCKS proxy"),
        ("socks5h://user:hunter22@127.0.0.1:1080", "SOCKS proxy"),
        ("ftp://proxy:21", r"Not an http\(s\)://host:port"),
        ("http://proxy:99999", r"Not an http\(s\)://host:port"),
        ("http://proxy:3128/path", "has no path"),
    ],
)
def test_unusable_proxy_is_a_config_error_naming_the_key(
    tmp_path: Path, value: str, words: str
) -> None:
    path = config_file(tmp_path, "https://api.example.com/v1", value)
    with pytest.raises(ConfigError, match=words) as info:
        load_settings(path, environ={})
    assert "providers.corp.proxy" in str(info.value)
    assert "hunter22" not in str(info.value)
    with pytest.raises(ConfigError, match="HTTPS_PROXY"):
        load_settings(environ={"TOKENRELAY_UPSTREAM_URL": "https://api.example.com/v1",
                               "HTTPS_PROXY": value})


def test_proxy_password_is_hidden_and_redacted() -> None:
    settings = load_settings(environ={"TOKENRELAY_UPSTREAM_URL": "https://api.example.com/v1",
                                      "HTTPS_PROXY": "http://me:pa%24%24word@proxy:3128"})
    provider = settings.providers["upstream"]
    assert provider.proxy_display == "http://me:***@proxy:3128"
    assert "pa%24%24word" not in repr(provider)
    assert {"pa%24%24word", "pa$$word"} <= set(settings.secrets)
