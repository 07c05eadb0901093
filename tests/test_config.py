"""Settings (config.py): where each value comes from, and what a bad one says.

Sources, later ones winning: built-in defaults, the TOML file (``--config`` or
``TOKENRELAY_CONFIG``), ``TOKENRELAY_*`` environment variables, then the command line
(``tokenrelay serve --host/--port``, which reach ``load_settings`` as overrides). A bad
value fails at startup with a :class:`ConfigError` that names the key or variable, and
never shows a secret. The failover settings (test_config_failover.py) and proxy settings
(test_proxy.py) have their own files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support.processes import serve_dry_run
from tokenrelay.config import Provider, Settings, load_settings
from tokenrelay.errors import ConfigError

UPSTREAM_KEY = "sk-upstream-5e3c7a91d2"


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokenrelay.toml"
    path.write_text(text, encoding="utf-8")
    return path


# -- precedence ----------------------------------------------------------------------------

PROVIDER = '[providers.p]\nbase_url = "http://127.0.0.1:9/v1"\n'

# (name, TOML that sets it, its environment variable, the value the TOML gives, the value
#  the variable gives, where it lands in Settings). Defaults are read from the dataclasses.
SOURCES: list[tuple[str, str, str, str, Any, Callable[[Settings], Any]]] = [
    ("port", "[server]\nport = 8100\n", "TOKENRELAY_PORT", "8200",
     (8100, 8200), lambda s: s.port),
    ("grace_s", "[server]\ngrace_s = 2.5\n", "TOKENRELAY_GRACE_S", "7",
     (2.5, 7.0), lambda s: s.grace_s),
    ("log_level", '[server]\nlog_level = "debug"\n', "TOKENRELAY_LOG_LEVEL", "warning",
     ("debug", "warning"), lambda s: s.log_level),
    ("journal.max_events", "[server.journal]\nmax_events = 50\n",
     "TOKENRELAY_JOURNAL_MAX_EVENTS", "60", (50, 60), lambda s: s.journal.max_events),
    ("limits.max_body_bytes", "[server.limits]\nmax_body_bytes = 5000\n",
     "TOKENRELAY_MAX_BODY_BYTES", "6000", (5000, 6000), lambda s: s.limits.max_body_bytes),
    ("rate_limits.requests_per_minute", "[limits]\nrequests_per_minute = 30\n",
     "TOKENRELAY_RPM", "40", (30, 40), lambda s: s.rate_limits.requests_per_minute),
    ("provider timeouts.connect", PROVIDER + "[providers.p.timeouts]\nconnect = 3\n",
     "TOKENRELAY_CONNECT_TIMEOUT_S", "4", (3.0, 4.0),
     lambda s: s.providers["p"].timeouts.connect),
    ("provider retry.max_attempts", PROVIDER + "[providers.p.retry]\nmax_attempts = 2\n",
     "TOKENRELAY_RETRY_MAX_ATTEMPTS", "1", (2, 1), lambda s: s.providers["p"].retry.max_attempts),
    ("allowed_hosts", '[server]\nallowed_hosts = ["a.example"]\n', "TOKENRELAY_ALLOWED_HOSTS",
     "b.example", (("a.example",), ("b.example",)), lambda s: s.allowed_hosts),
    ("cors_origins", '[server]\ncors_origins = ["https://a.example"]\n',
     "TOKENRELAY_CORS_ORIGINS", "https://b.example",
     (("https://a.example",), ("https://b.example",)), lambda s: s.cors_origins),
]


def _default(get: Callable[[Settings], Any]) -> Any:
    """The built-in default, read through the same getter (a provider's: of a bare one)."""
    return get(Settings(providers={"p": Provider("p", "")}))


@pytest.mark.parametrize(("toml", "variable", "env_value", "values", "get"),
                         [case[1:] for case in SOURCES], ids=[case[0] for case in SOURCES])
def test_the_file_overrides_the_defaults_and_the_environment_overrides_the_file(
    tmp_path: Path, toml: str, variable: str, env_value: str, values: tuple[Any, Any],
    get: Callable[[Settings], Any],
) -> None:
    from_file, from_env = values
    default = _default(get)
    assert default not in (from_file, from_env)  # or the test could not tell them apart
    path = write_config(tmp_path, toml)
    if "providers" not in toml:
        assert get(load_settings(environ={})) == default
    assert get(load_settings(path, environ={})) == from_file
    assert get(load_settings(path, environ={variable: env_value})) == from_env
    if "providers" not in toml:
        assert get(load_settings(environ={variable: env_value})) == from_env


def test_overrides_win_over_the_environment_and_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[server]\nport = 8100\nhost = "127.0.0.2"\ngrace_s = 2\n')
    env = {"TOKENRELAY_PORT": "8200", "TOKENRELAY_HOST": "127.0.0.3"}
    settings = load_settings(path, environ=env, port=8300, host="127.0.0.4")
    assert (settings.port, settings.host, settings.grace_s) == (8300, "127.0.0.4", 2.0)


def test_the_config_file_comes_from_the_argument_before_TOKENRELAY_CONFIG(tmp_path: Path) -> None:
    named = write_config(tmp_path, "[server]\nport = 8100\n")
    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 8400\n", encoding="utf-8")
    assert load_settings(environ={"TOKENRELAY_CONFIG": str(named)}).port == 8100
    assert load_settings(other, environ={"TOKENRELAY_CONFIG": str(named)}).port == 8400


def _serve_address(tmp_path: Path, env: dict[str, str], *args: str) -> str:
    """Where the real ``tokenrelay serve`` would listen, from its start-up line."""
    result = serve_dry_run({"TOKENRELAY_DATABASE_URL": "none", **env}, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if " on http://" in line]
    return line.split(" on ")[1].split()[0]


def test_serve_options_win_over_the_environment_which_wins_over_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[server]\nhost = "127.0.0.2"\nport = 8101\n')
    config = ("--config", str(path))
    assert _serve_address(tmp_path, {}, *config) == "http://127.0.0.2:8101/"
    env = {"TOKENRELAY_HOST": "127.0.0.3", "TOKENRELAY_PORT": "8102"}
    assert _serve_address(tmp_path, env, *config) == "http://127.0.0.3:8102/"
    assert _serve_address(tmp_path, env, *config, "--port", "8103") == "http://127.0.0.3:8103/"
    assert (_serve_address(tmp_path, env, *config, "--host", "127.0.0.4", "--port", "8103")
            == "http://127.0.0.4:8103/")


def test_settings_are_frozen() -> None:
    settings = load_settings(environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


# -- errors name the key -------------------------------------------------------------------


@pytest.mark.parametrize(("toml", "key"), [
    ('[server]\nport = "eighty"\n', "'server.port'"),
    ("[server]\ngrace_s = -1\n", "'server.grace_s'"),
    ("[server]\nlog_json = 1\n", "'server.log_json'"),
    ("[server]\nportt = 8000\n", "'server.portt'"),
    ('[server.journal]\nmax_events = "many"\n', "'server.journal.max_events'"),
    ("[server.limits]\nmax_body_bytes = -5\n", "'server.limits.max_body_bytes'"),
    ('[limits]\nrequests_per_minute = "lots"\n', "'limits.requests_per_minute'"),
    ('[server]\ncors_origins = ["*"]\n', "'server.cors_origins'"),
    ("[server]\nallowed_models = [1]\n", "'server.allowed_models'"),
    ("[providers.p]\napi_key_env = 'X'\n", "'providers.p.base_url'"),
    (PROVIDER + "[providers.p.timeouts]\nconnect = 'slow'\n", "'providers.p.timeouts.connect'"),
    (PROVIDER + "[providers.p.retry]\nmax_attempts = -1\n", "'providers.p.retry.max_attempts'"),
    (PROVIDER + "headers = 'Authorization: x'\n", "'providers.p.headers'"),
    (PROVIDER + "colour = 'blue'\n", "'providers.p.colour'"),
    (PROVIDER + "api_key_env = 'TOKENRELAY_TEST_NOT_SET'\n", "'providers.p.api_key_env'"),
    (PROVIDER + "[models.m]\nprovider = 'q'\n", "'models.m.provider'"),
    (PROVIDER + "[models.m]\nprovider = 'p'\nfallbacks = ['nope']\n", "'models.m.fallbacks'"),
    ("[auth]\nkeys = 'one-key-0123456789'\n", "'auth.keys'"),
    ("[auth]\nrealm = 'x'\n", "'auth.realm'"),
    ("providers = 'p'\n", "'providers'"),
])
def test_a_bad_value_in_the_file_fails_naming_its_key(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path, toml), environ={})
    assert key in caught.value.message


@pytest.mark.parametrize(("env", "key"), [
    ({"TOKENRELAY_PORT": "eighty"}, "TOKENRELAY_PORT"),
    ({"TOKENRELAY_PORT": "-1"}, "TOKENRELAY_PORT"),
    ({"TOKENRELAY_MAX_HEADERS": "x"}, "TOKENRELAY_MAX_HEADERS"),
    ({"TOKENRELAY_LOG_JSON": "maybe"}, "TOKENRELAY_LOG_JSON"),
    ({"TOKENRELAY_CORS_ORIGINS": "ftp://x"}, "TOKENRELAY_CORS_ORIGINS"),
    ({"TOKENRELAY_API_KEYS": "alice:short"}, "TOKENRELAY_API_KEYS[0]"),
    ({"TOKENRELAY_HEARTBEAT_S": "0"}, "heartbeat_s"),
    ({"TOKENRELAY_GRACE_S": "soon"}, "TOKENRELAY_GRACE_S"),
    ({"TOKENRELAY_RPM": "many"}, "TOKENRELAY_RPM"),
    ({"TOKENRELAY_JOURNAL_MAX_EVENTS": "-3"}, "TOKENRELAY_JOURNAL_MAX_EVENTS"),
    ({"TOKENRELAY_MAX_BODY_BYTES": "1MB"}, "TOKENRELAY_MAX_BODY_BYTES"),
    ({"TOKENRELAY_CONNECT_TIMEOUT_S": "slow"}, "TOKENRELAY_CONNECT_TIMEOUT_S"),
    ({"TOKENRELAY_RETRY_MAX_ATTEMPTS": "twice"}, "TOKENRELAY_RETRY_MAX_ATTEMPTS"),
])
def test_a_bad_environment_variable_fails_naming_it(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=env)
    assert key in caught.value.message


def test_an_unreadable_or_broken_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_settings(missing, environ={})
    broken = write_config(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_settings(broken, environ={})
    assert "tokenrelay.toml" in caught.value.message


def test_serve_reports_a_bad_setting_by_name_and_exits_2(tmp_path: Path) -> None:
    result = serve_dry_run({"TOKENRELAY_PORT": "eighty"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "TOKENRELAY_PORT" in result.stderr and "Traceback" not in result.stderr


# -- secrets never appear in errors -------------------------------------------------------


@pytest.mark.parametrize(("toml", "env", "secret", "key"), [
    # An upstream key written into the file instead of named by api_key_env.
    (PROVIDER + f"api_key = '{UPSTREAM_KEY}'\n", {}, UPSTREAM_KEY, "'providers.p.api_key'"),
    # An upstream key in the environment while another setting is wrong.
    ("", {"TOKENRELAY_UPSTREAM_URL": "http://127.0.0.1:9/v1",
          "TOKENRELAY_UPSTREAM_API_KEY": UPSTREAM_KEY, "TOKENRELAY_PORT": "x"},
     UPSTREAM_KEY, "TOKENRELAY_PORT"),
    # Client keys that break a rule: the error names the key's name or position.
    ("[auth]\nkeys = [{name = 'bad name', key = 'sk-client-0123456789'}]\n", {},
     "sk-client-0123456789", "'auth.keys[0].key'"),
    ("[auth]\nkeys = ['sk client 0123456789']\n", {}, "sk client 0123456789", "'auth.keys[0]'"),
    ("", {"TOKENRELAY_API_KEYS": "carol:sk-carol 0123456789"}, "sk-carol 0123456789",
     "(key 'carol')"),
    ("", {"TOKENRELAY_API_KEYS": "sk-bare key-0123456789"}, "sk-bare key-0123456789",
     "TOKENRELAY_API_KEYS[0]"),
    ("[auth]\nkeys = [{name = 'a', key = 'sk-same-0123456789'}, "
     "{name = 'b', key = 'sk-same-0123456789'}]\n", {}, "sk-same-0123456789", "'auth.keys'"),
    ("", {"TOKENRELAY_METRICS_TOKEN": "sk-met"}, "sk-met", "metrics_token"),
    # A proxy password, in a provider's proxy key and in HTTPS_PROXY.
    (PROVIDER.replace("http:", "https:") + "proxy = 'socks5://me:proxy-pass-77@127.0.0.1:1080'\n",
     {}, "proxy-pass-77", "'providers.p.proxy'"),
    ("", {"TOKENRELAY_UPSTREAM_URL": "https://api.example/v1",
          "HTTPS_PROXY": "http://me:proxy-pass-77@proxy:3128/path"},
     "proxy-pass-77", "HTTPS_PROXY"),
])
def test_a_config_error_never_shows_a_secret(tmp_path: Path, toml: str, env: dict[str, str],
                                             secret: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path, toml), environ=env)
    assert key in caught.value.message
    assert secret not in caught.value.message and secret not in str(caught.value)


def test_settings_never_print_a_secret() -> None:
    settings = load_settings(environ={
        "TOKENRELAY_UPSTREAM_URL": "http://127.0.0.1:9/v1",
        "TOKENRELAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "TOKENRELAY_API_KEYS": "carol:sk-client-0123456789",
        "TOKENRELAY_METRICS_TOKEN": "sk-metrics-0123456789",
    })
    shown = repr(settings)
    for secret in (UPSTREAM_KEY, "sk-client-0123456789", "sk-metrics-0123456789"):
        assert secret not in shown
        assert secret in settings.secrets  # and the log filter redacts each


# -- configuration -----------------------------------------------------------------------


def test_keys_from_toml_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text(
        '[auth]\nkeys = [{name = "alice", key_env = "ALICE_KEY"}, "bare-key-0123456789",\n'
        '        {name = "carol", key = "carol-key-0123456789"}]\n'
        "[limits]\nrequests_per_minute = 30\nconcurrent_streams = 2\n"
        '[server]\ncors_origins = ["https://chat.example"]\nallowed_models = ["sim-chat"]\n'
        "log_json = true\n"
    )
    env = {"ALICE_KEY": "alice-key-0123456789", "TOKENRELAY_API_KEYS": "dave:dave-key-01234567",
           "TOKENRELAY_TPM": "1000"}
    settings = load_settings(config, environ=env)
    names = [k.name for k in settings.api_keys]
    assert names[0] == "alice" and names[2:] == ["carol", "dave"]
    assert names[1].startswith("key-") and "bare" not in names[1]
    assert settings.api_keys[0].owner == "key:alice"
    assert "alice-key" not in repr(settings)  # keys never print
    assert settings.rate_limits.requests_per_minute == 30
    assert settings.rate_limits.concurrent_streams == 2
    assert settings.rate_limits.tokens_per_minute == 1000
    assert settings.cors_origins == ("https://chat.example",)
    assert settings.log_json is True
    assert settings.route("sim-chat") is not None and settings.route("sim-fast") is None
    assert {"alice-key-0123456789", "dave-key-01234567"} <= set(settings.secrets)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOKENRELAY_API_KEYS": "alice:short"}, "at least 8"),
        ({"TOKENRELAY_API_KEYS": "al ice:long-enough-key"}, "name"),
        ({"TOKENRELAY_API_KEYS": "a:long-enough-key,a:other-long-key"}, "more than once"),
        ({"TOKENRELAY_API_KEYS": "a:long-enough-key,b:long-enough-key"}, "same key"),
        ({"TOKENRELAY_RPM": "many"}, "TOKENRELAY_RPM"),
        ({"TOKENRELAY_MAX_CONCURRENT_STREAMS": "-1"}, "TOKENRELAY_MAX_CONCURRENT_STREAMS"),
        ({"TOKENRELAY_CORS_ORIGINS": "*"}, "wildcard"),
        ({"TOKENRELAY_CORS_ORIGINS": "https://a.example/path"}, "no path"),
        ({"TOKENRELAY_LOG_JSON": "maybe"}, "LOG_JSON"),
        ({"TOKENRELAY_ALLOWED_HOSTS": "http://chat.example"}, "allowed_hosts"),
        ({"TOKENRELAY_HEADER_TIMEOUT_S": "0"}, "header_timeout_s"),
        ({"TOKENRELAY_MAX_HEADERS": "0"}, "max_headers"),
        ({"TOKENRELAY_TRUSTED_USER_HEADER": "X-User"}, "trusted_proxies"),
        ({"TOKENRELAY_TRUSTED_USER_HEADER": "X-User", "TOKENRELAY_TRUSTED_PROXIES": "proxy"},
         "trusted_proxies"),
        ({"TOKENRELAY_TRUSTED_USER_HEADER": "Authorization",
          "TOKENRELAY_TRUSTED_PROXIES": "127.0.0.1"}, "cannot be"),
        ({"TOKENRELAY_TRUSTED_USER_HEADER": "X User", "TOKENRELAY_TRUSTED_PROXIES": "::1"},
         "trusted_user_header"),
        ({"TOKENRELAY_SIGN_OUT_URL": "javascript:alert(1)"}, "sign_out_url"),
        ({"TOKENRELAY_METRICS_TOKEN": "short"}, "metrics_token"),
        ({"TOKENRELAY_ADMIN_KEYS": "nobody"}, "admin_keys"),
    ],
)
def test_bad_security_config_fails_naming_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=env)
    assert message in caught.value.message
    for part in env.get("TOKENRELAY_API_KEYS", "").split(","):
        secret = part.partition(":")[2]
        if secret:
            assert secret not in caught.value.message  # a config error never shows a key


def test_host_proxy_and_operator_settings_from_toml_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text(
        '[server]\nallowed_hosts = ["Chat.Example", "10.0.0.5:8000"]\nheader_timeout_s = 5\n'
        'max_headers = 60\nmetrics_token = "toml-metrics-token"\n'
        '[auth]\nkeys = [{name = "ops", key = "ops-key-0123456789"}]\nadmin_keys = ["ops"]\n'
        'trusted_user_header = "X-Auth-Request-Email"\n'
        'trusted_proxies = ["10.0.0.0/8", "::1"]\nsign_out_url = "/oauth2/sign_out"\n'
    )
    settings = load_settings(config, environ={})
    assert settings.allowed_hosts == ("chat.example", "10.0.0.5:8000")
    assert (settings.header_timeout_s, settings.max_headers) == (5.0, 60)
    assert settings.admin_keys == ("ops",)
    assert settings.trusted_user_header == "X-Auth-Request-Email"
    assert settings.trusted_proxies == ("10.0.0.0/8", "::1")
    assert settings.sign_out_url == "/oauth2/sign_out"
    assert "toml-metrics-token" in settings.secrets  # redacted from logs
    assert "toml-metrics-token" not in repr(settings)
    env = {"TOKENRELAY_METRICS_TOKEN": "env-metrics-token", "TOKENRELAY_ALLOWED_HOSTS": "*",
           "TOKENRELAY_TRUSTED_PROXIES": "127.0.0.1"}
    settings = load_settings(config, environ=env)  # the environment wins
    assert settings.metrics_token == "env-metrics-token"
    assert settings.allowed_hosts == ("*",) and settings.trusted_proxies == ("127.0.0.1",)


def test_key_env_must_be_set(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[auth]\nkeys = [{name = "alice", key_env = "NOT_SET_ANYWHERE"}]\n')
    with pytest.raises(ConfigError, match=r"auth\.keys\[0\]\.key_env"):
        load_settings(config, environ={})
