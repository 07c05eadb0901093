"""Settings: read once from a TOML file and the environment, typed, frozen, validated.

This is the only module that reads the environment or the config file. Everything else
gets a :class:`Settings` passed down, so any component can be tested with a hand-built one.

Sources, later ones winning: built-in defaults, the TOML file (``--config`` or
``TOKENRELAY_CONFIG``), then ``TOKENRELAY_*`` environment variables.

With no upstream configured at all, every model routes to the built-in simulator.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from tokenrelay.errors import ConfigError
from tokenrelay.simulator.catalogue import DEFAULT_MODELS

SIMULATOR = "simulator"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Time budgets for one upstream request, in seconds."""

    connect: float = 10.0
    first_token: float = 120.0  # reasoning models can think for minutes
    idle: float = 60.0  # between two chunks once streaming
    total: float = 900.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries before the first token: exponential backoff with full jitter."""

    max_attempts: int = 4  # per model, including the first try
    base_delay: float = 0.5
    max_delay: float = 20.0
    max_retry_after: float = 60.0  # cap on what an upstream's Retry-After may make us wait
    budget: float = 120.0  # total seconds spent waiting across attempts and fallbacks


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Circuit breaker per route: ``failures`` consecutive failed requests (0: off) open it
    for ``cooldown_s``, then one request probes it."""

    failures: int = 5
    cooldown_s: float = 30.0


# How a provider takes an assistant prefix to continue (``prefill_flag``): "" a plain last
# assistant message; "prefix" also sets ``"prefix": true`` on it (DeepSeek, Mistral);
# "continue_final_message" adds vLLM's ``continue_final_message``/``add_generation_prompt``.
PREFILL_FLAGS = ("", "prefix", "continue_final_message")


@dataclass(frozen=True, slots=True)
class Provider:
    """An OpenAI-compatible upstream."""

    name: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    timeouts: Timeouts = Timeouts()
    retry: RetryPolicy = RetryPolicy()
    headers: tuple[tuple[str, str], ...] = ()
    # The HTTP proxy its requests go through (None: direct), resolved once from the
    # provider's ``proxy`` key or the *_PROXY/NO_PROXY variables; may carry user:pass@.
    proxy: str | None = field(default=None, repr=False)
    proxy_from: str = ""  # where that came from, for the start-up log ("HTTPS_PROXY", ...)

    @property
    def proxy_display(self) -> str:
        """The proxy URL with its password replaced, fit for logs and error messages."""
        return redact_proxy(self.proxy) if self.proxy else "direct"
    breaker: BreakerPolicy = BreakerPolicy()
    supports_prefill: bool = False  # continues a last assistant message exactly
    prefill_flag: str = ""  # one of PREFILL_FLAGS


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """A client-facing model name mapped to a provider and its upstream model name."""

    name: str
    provider: str
    upstream_model: str
    fallbacks: tuple[str, ...] = ()
    think_tags: bool = False  # <think>...</think> inside content is reasoning
    description: str = ""
    simulated: bool = False
    # Failover policy (issue 15). first_token: None is the provider's timeouts.first_token.
    first_token: float | None = None
    retry_on_timeout: bool = False  # retry a route that timed out although a next one exists
    context_fallbacks: tuple[str, ...] = ()  # models for a "context too long" refusal
    continue_after_cut: bool = False  # continue a cut answer from its exact partial text
    supports_prefill: bool | None = None  # None: the provider's supports_prefill


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits (4xx when exceeded)."""

    max_body_bytes: int = 1_000_000
    max_messages: int = 500
    max_message_chars: int = 200_000
    max_tokens_cap: int = 32_768
    body_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Per-client-key limits on starting streams (429 when exceeded); 0 means no limit."""

    requests_per_minute: int = 0  # token bucket: bursts up to this many, refills evenly
    concurrent_streams: int = 0  # open generations at once
    tokens_per_minute: int = 0  # completion tokens, counted when a generation finishes
    stream_lease_s: float = 3600.0  # a concurrency slot held by a dead instance frees itself

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.concurrent_streams or self.tokens_per_minute)


@dataclass(frozen=True, slots=True)
class JournalLimits:
    """Bounds of a journal (see :mod:`tokenrelay.journal.base`)."""

    max_events: int = 100_000
    max_bytes: int = 16 * 1024 * 1024
    max_streams: int = 20_000
    retention_s: float = 600.0


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A client API key. ``name`` identifies the tenant in logs and storage; the key never."""

    name: str
    key: str = field(repr=False)

    @property
    def owner(self) -> str:
        """The tenant id stored with streams and conversations."""
        return "key:" + self.name


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything tokenrelay needs to run; frozen once loaded."""

    host: str = "127.0.0.1"
    port: int = 8000
    providers: Mapping[str, Provider] = field(default_factory=dict)
    models: Mapping[str, ModelRoute] = field(default_factory=dict)
    passthrough_provider: str | None = None  # any unknown model name goes here
    default_model: str | None = None
    heartbeat_s: float = 15.0
    grace_s: float = 30.0
    drain_s: float = 10.0  # on SIGTERM: how long running answers may finish
    send_timeout_s: float = 30.0  # a client that does not read for this long is dropped
    checkpoint_s: float = 1.0
    journal_url: str = "memory://"
    journal: JournalLimits = JournalLimits()
    database_url: str = "sqlite:///tokenrelay.db"
    redis_url: str | None = None
    redis_prefix: str = "tokenrelay:"  # every Redis key tokenrelay writes starts with this
    lease_s: float = 5.0  # cluster: an owner silent this long is dead; readers end its streams
    limits: Limits = Limits()
    simulator_speed: float = 1.0
    log_level: str = "info"
    log_json: bool = False
    instance_id: str | None = None
    api_keys: tuple[ApiKey, ...] = ()  # none: one local user, no auth (loopback default)
    rate_limits: RateLimits = RateLimits()
    cors_origins: tuple[str, ...] = ()  # none: CORS off (same-origin page only)
    allowed_models: tuple[str, ...] | None = None  # None: every configured model
    # Host names served besides the defaults (see tokenrelay.guard); ("*",): any Host.
    allowed_hosts: tuple[str, ...] = ()
    header_timeout_s: float = 10.0  # a request head must be complete within this
    max_headers: int = 100  # request header lines; more is 431
    trusted_user_header: str | None = None  # set by an auth proxy: tenant "user:<value>"
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose trusted_user_header is believed
    sign_out_url: str | None = None  # the auth proxy's sign-out link, shown on the page
    metrics_token: str | None = field(default=None, repr=False)  # bearer token for /metrics
    admin_keys: tuple[str, ...] = ()  # names of client keys that see every tenant's stats

    def route(self, model: str) -> ModelRoute | None:
        """The route for a client-facing model name, or None if unknown."""
        if self.allowed_models is not None and model not in self.allowed_models:
            return None
        found = self.models.get(model)
        if found is None and self.passthrough_provider is not None and model:
            return ModelRoute(model, self.passthrough_provider, model)
        return found

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every upstream and client key, for redaction."""
        upstream = tuple(p.api_key for p in self.providers.values() if p.api_key)
        passwords = [urlsplit(p.proxy).password for p in self.providers.values() if p.proxy]
        # Short ones are left out: replacing "pw" everywhere would garble every message
        # (proxy URLs are only ever shown through redact_proxy anyway).
        proxy = tuple({form for pw in passwords if pw and len(pw) >= 6
                       for form in (pw, unquote(pw))})
        metrics = (self.metrics_token,) if self.metrics_token else ()
        return upstream + proxy + tuple(k.key for k in self.api_keys) + metrics


_ENV_FLOATS = {
    "TOKENRELAY_HEARTBEAT_S": "heartbeat_s",
    "TOKENRELAY_GRACE_S": "grace_s",
    "TOKENRELAY_DRAIN_S": "drain_s",
    "TOKENRELAY_SEND_TIMEOUT_S": "send_timeout_s",
    "TOKENRELAY_CHECKPOINT_S": "checkpoint_s",
    "TOKENRELAY_SIMULATOR_SPEED": "simulator_speed",
    "TOKENRELAY_LEASE_S": "lease_s",
    "TOKENRELAY_HEADER_TIMEOUT_S": "header_timeout_s",
}
_ENV_STRINGS = {
    "TOKENRELAY_HOST": "host",
    "TOKENRELAY_JOURNAL_URL": "journal_url",
    "TOKENRELAY_DATABASE_URL": "database_url",
    "TOKENRELAY_REDIS_URL": "redis_url",
    "TOKENRELAY_REDIS_PREFIX": "redis_prefix",
    "TOKENRELAY_LOG_LEVEL": "log_level",
    "TOKENRELAY_DEFAULT_MODEL": "default_model",
    "TOKENRELAY_INSTANCE_ID": "instance_id",
}
_RATE_ENV = {
    "TOKENRELAY_RPM": "requests_per_minute",
    "TOKENRELAY_MAX_CONCURRENT_STREAMS": "concurrent_streams",
    "TOKENRELAY_TPM": "tokens_per_minute",
    "TOKENRELAY_STREAM_LEASE_S": "stream_lease_s",
}
_TIMEOUT_ENV = {
    "TOKENRELAY_CONNECT_TIMEOUT_S": "connect",
    "TOKENRELAY_FIRST_TOKEN_TIMEOUT_S": "first_token",
    "TOKENRELAY_IDLE_TIMEOUT_S": "idle",
    "TOKENRELAY_TOTAL_TIMEOUT_S": "total",
}
_RETRY_ENV = {
    "TOKENRELAY_RETRY_MAX_ATTEMPTS": "max_attempts",
    "TOKENRELAY_RETRY_BASE_DELAY_S": "base_delay",
    "TOKENRELAY_RETRY_MAX_DELAY_S": "max_delay",
    "TOKENRELAY_RETRY_AFTER_MAX_S": "max_retry_after",
    "TOKENRELAY_RETRY_BUDGET_S": "budget",
}
_BREAKER_ENV = {
    "TOKENRELAY_BREAKER_FAILURES": "failures",
    "TOKENRELAY_BREAKER_COOLDOWN_S": "cooldown_s",
}
_JOURNAL_ENV = {
    "TOKENRELAY_JOURNAL_MAX_EVENTS": "max_events",
    "TOKENRELAY_JOURNAL_MAX_BYTES": "max_bytes",
    "TOKENRELAY_JOURNAL_MAX_STREAMS": "max_streams",
    "TOKENRELAY_RETENTION_S": "retention_s",
}
_LIMITS_ENV = {
    "TOKENRELAY_MAX_BODY_BYTES": "max_body_bytes",
    "TOKENRELAY_MAX_MESSAGES": "max_messages",
    "TOKENRELAY_MAX_MESSAGE_CHARS": "max_message_chars",
    "TOKENRELAY_MAX_TOKENS_CAP": "max_tokens_cap",
    "TOKENRELAY_BODY_TIMEOUT_S": "body_timeout_s",
}


def _number(key: str, value: Any, kind: type) -> Any:
    """Convert ``value`` to int/float or fail naming the key (starlette.config style)."""
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"Config {key!r} has value {value!r}. Not a valid {kind.__name__}."
        ) from None
    if number < 0:
        raise ConfigError(f"Config {key!r} has value {value!r}. Must not be negative.")
    return number


def _overlay(
    obj: Any, values: Mapping[str, Any], where: str, names: Mapping[str, str] | None = None
) -> Any:
    """Return a copy of dataclass ``obj`` with ``values`` applied, type-checked per field.

    An error names the setting as ``where.key``, or as ``names[key]`` when given (the
    environment variable the value came from)."""
    known = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = names[key] if names and key in names else f"{where}.{key}"
        if key not in known:
            raise ConfigError(f"Config '{name}' is not a known setting.")
        current = getattr(obj, key)
        if isinstance(current, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"Config '{name}' has value {value!r}. Not a bool.")
            changes[key] = value
        elif isinstance(current, int | float):
            changes[key] = _number(name, value, type(current))
        else:
            changes[key] = value
    return replace(obj, **changes)


def _env_overlay(obj: Any, env: Mapping[str, str], table: Mapping[str, str]) -> Any:
    """Apply the variables of ``table`` (variable -> field) that are set; an error names
    the variable, which is what the user typed."""
    present = {var: attr for var, attr in table.items() if var in env}
    values = {attr: env[var] for var, attr in present.items()}
    return _overlay(obj, values, "env", {attr: var for var, attr in present.items()})


def simulator_models() -> dict[str, ModelRoute]:
    """Routes for the built-in simulator's models."""
    return {
        spec.name: ModelRoute(
            spec.name,
            SIMULATOR,
            spec.name,
            think_tags=spec.think_tags,
            description=spec.description,
            simulated=True,
        )
        for spec in DEFAULT_MODELS
    }


def _parse_providers(raw: Any, env: Mapping[str, str]) -> dict[str, Provider]:
    if not isinstance(raw, dict):
        raise ConfigError("Config 'providers' must be a table of tables.")
    providers: dict[str, Provider] = {}
    for name, table in raw.items():
        where = f"providers.{name}"
        if not isinstance(table, dict) or not isinstance(table.get("base_url"), str):
            raise ConfigError(f"Config '{where}.base_url' is required (a URL string).")
        key_env = table.get("api_key_env")
        api_key = None
        if key_env is not None:
            if not isinstance(key_env, str):
                raise ConfigError(f"Config '{where}.api_key_env' must name a variable.")
            api_key = env.get(key_env) or None
            if api_key is None:
                raise ConfigError(
                    f"Config '{where}.api_key_env' names {key_env!r}, which is not set."
                )
        headers = table.get("headers", {})
        if not isinstance(headers, dict):
            raise ConfigError(f"Config '{where}.headers' must be a table of strings.")
        providers[name] = Provider(
            name=name,
            base_url=table["base_url"].rstrip("/"),
            api_key=api_key,
            timeouts=_overlay(Timeouts(), table.get("timeouts", {}), f"{where}.timeouts"),
            retry=_overlay(RetryPolicy(), table.get("retry", {}), f"{where}.retry"),
            headers=tuple((str(k), str(v)) for k, v in headers.items()),
            breaker=_overlay(BreakerPolicy(), table.get("breaker", {}), f"{where}.breaker"),
            supports_prefill=_flag(table, "supports_prefill", where),
            prefill_flag=_prefill_flag(table, where),
        )
        if "proxy" in table:  # explicit: overrides the environment; "" means direct
            if not isinstance(table["proxy"], str):
                raise ConfigError(f"Config '{where}.proxy' must be a proxy URL string.")
            providers[name] = replace(
                providers[name], proxy=_proxy_url(table["proxy"], f"{where}.proxy"),
                proxy_from=f"{where}.proxy",
            )
        unknown = set(table) - {"base_url", "api_key_env", "timeouts", "retry", "headers",
                                "proxy", "breaker", "supports_prefill", "prefill_flag"}
        if unknown:
            raise ConfigError(f"Config '{where}.{sorted(unknown)[0]}' is not a known setting.")
    return providers


def redact_proxy(url: str) -> str:
    """``url`` with the password of its ``user:pass@`` replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{parts.username}:***@{host}"


def _proxy_url(value: str, where: str) -> str | None:
    """A validated proxy URL (``http://`` assumed without a scheme, as curl does), or None
    for an empty value."""
    value = value.strip()
    if not value:
        return None
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    shown = redact_proxy(value)
    if scheme.startswith("socks"):
        raise ConfigError(
            f"Config {where!r} names a SOCKS proxy ({shown}); tokenrelay speaks to HTTP "
            "proxies only (http:// or https://). Set the provider's proxy = \"\" or list "
            "its host in NO_PROXY to connect directly."
        )
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ConfigError(f"Config {where!r} has value {shown!r}. Not an http(s)://host:port "
                          "proxy URL.")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"Config {where!r} has value {shown!r}. A proxy URL has no path.")
    return f"{scheme}://{parts.netloc}"


def _no_proxy_match(host: str, port: int, no_proxy: str) -> bool:
    """Whether NO_PROXY (curl's rules) exempts ``host:port``: ``*``, host names matching
    themselves and their subdomains (a leading ``.`` or ``*.`` is the same), ``host:port``,
    IP addresses and CIDR ranges."""
    host = host.lower().rstrip(".")
    try:
        ip: Any = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in re.split(r"[,\s]+", no_proxy.strip().lower()):
        if entry == "*":
            return True
        name, entry_port = entry, ""
        if entry.startswith("["):  # [::1] or [::1]:8080
            name, _, rest = entry[1:].partition("]")
            entry_port = rest[1:] if rest.startswith(":") else ""
        elif entry.count(":") == 1:
            name, entry_port = entry.split(":")
        if not name or (entry_port and entry_port != str(port)):
            continue
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.removeprefix("*").lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _env_proxy(base_url: str, env: Mapping[str, str]) -> tuple[str | None, str]:
    """The proxy for ``base_url`` from the environment, and the variable that named it
    (the lower-case spelling wins, as in curl and httpx); a NO_PROXY match is direct."""
    parts = urlsplit(base_url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None, ""
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if env.get(name, "").strip():
            break
    else:
        return None, ""
    no_proxy = env.get("no_proxy", env.get("NO_PROXY", ""))
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        return None, ""  # a bad base URL is reported on use
    if no_proxy and _no_proxy_match(parts.hostname, port, no_proxy):
        return None, "NO_PROXY"
    return _proxy_url(env[name], name), name


def _parse_models(raw: Any, providers: Mapping[str, Provider]) -> dict[str, ModelRoute]:
    if not isinstance(raw, dict):
        raise ConfigError("Config 'models' must be a table of tables.")
    models: dict[str, ModelRoute] = {}
    for name, table in raw.items():
        where = f"models.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"Config '{where}' must be a table.")
        provider = table.get("provider")
        if not isinstance(provider, str) or provider not in providers:
            raise ConfigError(f"Config '{where}.provider' names unknown provider {provider!r}.")
        fallbacks = table.get("fallbacks", [])
        if not isinstance(fallbacks, list) or not all(isinstance(f, str) for f in fallbacks):
            raise ConfigError(f"Config '{where}.fallbacks' must be a list of model names.")
        models[name] = ModelRoute(
            name=name,
            provider=provider,
            upstream_model=str(table.get("upstream_model", name)),
            fallbacks=tuple(fallbacks),
            think_tags=bool(table.get("think_tags", False)),
            description=str(table.get("description", "")),
            **_failover(table, where),
        )
    for route in models.values():
        for key in ("fallbacks", "context_fallbacks"):
            for fallback in getattr(route, key):
                if fallback not in models:
                    raise ConfigError(
                        f"Config 'models.{route.name}.{key}' names unknown model {fallback!r}."
                    )
    return models


def _flag(table: Mapping[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"Config '{where}.{key}' has value {value!r}. Not a bool.")
    return value


def _prefill_flag(table: Mapping[str, Any], where: str) -> str:
    value = table.get("prefill_flag", "")
    if value not in PREFILL_FLAGS:
        raise ConfigError(
            f"Config '{where}.prefill_flag' has value {value!r}. Use one of {PREFILL_FLAGS}."
        )
    return str(value)


def _failover(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A model's failover settings (issue 15): its own first-token deadline, timeout
    retries, context fallbacks, continuation after a cut, prefill support."""
    timeouts = table.get("timeouts", {})
    if not isinstance(timeouts, dict) or set(timeouts) - {"first_token"}:
        raise ConfigError(f"Config '{where}.timeouts' may only set first_token.")
    first_token = None
    if "first_token" in timeouts:
        first_token = _number(f"{where}.timeouts.first_token", timeouts["first_token"], float)
    context = table.get("context_fallbacks", [])
    if not isinstance(context, list) or not all(isinstance(f, str) for f in context):
        raise ConfigError(f"Config '{where}.context_fallbacks' must be a list of model names.")
    prefill = table.get("supports_prefill")
    if prefill is not None and not isinstance(prefill, bool):
        raise ConfigError(f"Config '{where}.supports_prefill' has value {prefill!r}. Not a bool.")
    return {
        "first_token": first_token,
        "retry_on_timeout": _flag(table, "retry_on_timeout", where),
        "context_fallbacks": tuple(context),
        "continue_after_cut": _flag(table, "continue_after_cut", where),
        "supports_prefill": prefill,
    }


_KEY_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
MIN_KEY_LENGTH = 8


def _api_key(name: str, key: Any, where: str) -> ApiKey:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"Config {where!r} must be a non-empty key string.")
    if not _KEY_NAME.fullmatch(name):
        raise ConfigError(
            f"Config {where!r} has name {name!r}. Use 1-64 letters, digits or _.@-"
        )
    # Keys travel in an HTTP header and in comma-separated env values.
    if len(key) < MIN_KEY_LENGTH or not all("!" <= c <= "~" and c != "," for c in key):
        raise ConfigError(
            f"Config {where!r} (key {name!r}) must be at least {MIN_KEY_LENGTH} printable "
            "ASCII characters without spaces or commas."
        )
    return ApiKey(name, key)


def _bare_name(key: str) -> str:
    """A stable tenant name for a key given without one (a short digest, not the key)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _parse_api_keys(auth: Any, env: Mapping[str, str]) -> tuple[ApiKey, ...]:
    """``[auth] keys`` (strings or ``{name, key | key_env}`` tables), then ``TOKENRELAY_API_KEYS``
    (comma-separated ``name:key`` or bare keys)."""
    if not isinstance(auth, dict):
        raise ConfigError("Config 'auth' must be a table.")
    unknown = set(auth) - {"keys", *_AUTH_SECURITY}
    if unknown:
        raise ConfigError(f"Config 'auth.{sorted(unknown)[0]}' is not a known setting.")
    raw = auth.get("keys", [])
    if not isinstance(raw, list):
        raise ConfigError("Config 'auth.keys' must be a list of keys or {name, key_env} tables.")
    keys: list[ApiKey] = []
    for i, item in enumerate(raw):
        where = f"auth.keys[{i}]"
        if isinstance(item, str):
            keys.append(_api_key(_bare_name(item), item, where))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"Config '{where}' must be a key string or a table with a name.")
        extra = set(item) - {"name", "key", "key_env"}
        if extra:
            raise ConfigError(f"Config '{where}.{sorted(extra)[0]}' is not a known setting.")
        if "key_env" in item:
            var = item["key_env"]
            if not isinstance(var, str) or not env.get(var):
                raise ConfigError(f"Config '{where}.key_env' names {var!r}, which is not set.")
            keys.append(_api_key(item["name"], env[var], f"{where}.key_env"))
        else:
            keys.append(_api_key(item["name"], item.get("key"), f"{where}.key"))
    for i, part in enumerate(p.strip() for p in env.get("TOKENRELAY_API_KEYS", "").split(",")):
        if not part:
            continue
        name, sep, key = part.partition(":")
        where = f"TOKENRELAY_API_KEYS[{i}]"
        keys.append(_api_key(name, key, where) if sep else _api_key(_bare_name(part), part, where))
    names = [k.name for k in keys]
    for k in keys:
        if names.count(k.name) > 1:
            raise ConfigError(f"Config 'auth.keys' names {k.name!r} more than once.")
    if len({k.key for k in keys}) != len(keys):
        raise ConfigError("Config 'auth.keys' lists the same key twice.")
    return tuple(keys)


def _string_list(value: Any, where: str) -> tuple[str, ...]:
    """A TOML list of strings, or a comma-separated env value."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"Config {where!r} must be a list of non-empty strings.")
    return tuple(value)


def _origins(value: Any, where: str) -> tuple[str, ...]:
    origins = _string_list(value, where)
    for origin in origins:
        if origin == "*" or not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(
                f"Config {where!r} has origin {origin!r}. Use scheme://host[:port], "
                "no path and no wildcard."
            )
    return origins


_AUTH_SECURITY = ("trusted_user_header", "trusted_proxies", "sign_out_url", "admin_keys")
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:[0-9]{1,5})?")
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")


def _parse_security(server: Any, auth: Any, env: Mapping[str, str]) -> dict[str, Any]:
    """Host allow-list, trusted auth proxy and admin keys (see tokenrelay.guard and
    tokenrelay.middleware): from ``[server]``/``[auth]`` and ``TOKENRELAY_*``."""
    auth = auth if isinstance(auth, dict) else {}
    out: dict[str, Any] = {}
    hosts = _string_list(server.get("allowed_hosts", []), "server.allowed_hosts")
    if "TOKENRELAY_ALLOWED_HOSTS" in env:
        hosts = _string_list(env["TOKENRELAY_ALLOWED_HOSTS"], "TOKENRELAY_ALLOWED_HOSTS")
    for host in hosts:
        if host != "*" and not _HOST.fullmatch(host):
            raise ConfigError(
                f"Config 'allowed_hosts' has {host!r}. Use a host name or address with an "
                "optional :port (IPv6 in brackets), or '*' for any."
            )
    out["allowed_hosts"] = tuple(h.lower() for h in hosts)
    for key in ("trusted_user_header", "sign_out_url"):
        value = env.get("TOKENRELAY_" + key.upper()) or auth.get(key)
        if value is not None:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"Config 'auth.{key}' must be a non-empty string.")
            out[key] = value
    proxies = _string_list(auth.get("trusted_proxies", []), "auth.trusted_proxies")
    if "TOKENRELAY_TRUSTED_PROXIES" in env:
        proxies = _string_list(env["TOKENRELAY_TRUSTED_PROXIES"], "TOKENRELAY_TRUSTED_PROXIES")
    for cidr in proxies:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(
                f"Config 'trusted_proxies' has {cidr!r}. Use addresses or CIDRs "
                "(10.0.0.0/8, 127.0.0.1, ::1)."
            ) from None
    out["trusted_proxies"] = proxies
    admins = _string_list(auth.get("admin_keys", []), "auth.admin_keys")
    if "TOKENRELAY_ADMIN_KEYS" in env:
        admins = _string_list(env["TOKENRELAY_ADMIN_KEYS"], "TOKENRELAY_ADMIN_KEYS")
    out["admin_keys"] = admins
    token = env.get("TOKENRELAY_METRICS_TOKEN") or server.get("metrics_token")
    if token is not None:
        if not isinstance(token, str) or len(token) < MIN_KEY_LENGTH:
            raise ConfigError(
                f"Config 'server.metrics_token' must be at least {MIN_KEY_LENGTH} characters.")
        out["metrics_token"] = token
    return out


def _check_security(settings: Settings) -> None:
    """Cross-checks of the security settings, once the environment has been applied."""
    if settings.header_timeout_s <= 0:
        raise ConfigError("Config 'header_timeout_s' must be positive.")
    if settings.max_headers < 1:
        raise ConfigError("Config 'max_headers' must be at least 1.")
    header = settings.trusted_user_header
    if header is not None:
        if not _HEADER_NAME.fullmatch(header):
            raise ConfigError(
                f"Config 'trusted_user_header' has {header!r}. Use a header name such as "
                "X-Forwarded-User.")
        if header.lower() in ("authorization", "host", "cookie", "content-type"):
            raise ConfigError(f"Config 'trusted_user_header' cannot be {header!r}.")
        if not settings.trusted_proxies:
            raise ConfigError(
                "Config 'trusted_user_header' needs 'trusted_proxies' (the auth proxy's "
                "addresses): without it anyone could name themselves.")
    url = settings.sign_out_url
    if url is not None and not re.fullmatch(r"(https?://[^\s\"'<>]+|/[^\s\"'<>]*)", url):
        raise ConfigError(
            f"Config 'sign_out_url' has {url!r}. Use an http(s) URL or a path starting with /.")
    if settings.metrics_token is not None and len(settings.metrics_token) < MIN_KEY_LENGTH:
        raise ConfigError(f"Config 'metrics_token' must be at least {MIN_KEY_LENGTH} characters.")
    names = {k.name for k in settings.api_keys}
    for name in settings.admin_keys:
        if name not in names:
            raise ConfigError(
                f"Config 'admin_keys' names {name!r}, which is not a configured key name.")


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from defaults, a TOML file, the environment and overrides."""
    env = os.environ if environ is None else environ
    path = path or env.get("TOKENRELAY_CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"Cannot read config file {str(path)!r}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {str(path)!r} is not valid TOML: {exc}") from None

    server = data.get("server", {})
    settings = Settings()
    own = ("journal", "limits", "cors_origins", "allowed_models", "allowed_hosts")
    simple = {k: v for k, v in server.items() if k not in own}
    settings = _overlay(settings, simple, "server")
    cors_origins = _origins(server.get("cors_origins", []), "server.cors_origins")
    if "TOKENRELAY_CORS_ORIGINS" in env:
        cors_origins = _origins(env["TOKENRELAY_CORS_ORIGINS"], "TOKENRELAY_CORS_ORIGINS")
    allowed = server.get("allowed_models")
    allowed_models = None if allowed is None else _string_list(allowed, "server.allowed_models")
    if env.get("TOKENRELAY_ALLOWED_MODELS"):
        allowed_models = _string_list(env["TOKENRELAY_ALLOWED_MODELS"],
                                      "TOKENRELAY_ALLOWED_MODELS")
    rate_limits = _overlay(RateLimits(), data.get("limits", {}), "limits")
    rate_limits = _env_overlay(rate_limits, env, _RATE_ENV)
    api_keys = _parse_api_keys(data.get("auth", {}), env)
    if "TOKENRELAY_LOG_JSON" in env:
        flag = env["TOKENRELAY_LOG_JSON"].strip().lower()
        if flag not in ("1", "0", "true", "false", "yes", "no", ""):
            raise ConfigError(f"Config 'TOKENRELAY_LOG_JSON' has value {flag!r}. Not a bool.")
        settings = replace(settings, log_json=flag in ("1", "true", "yes"))
    journal = _overlay(JournalLimits(), server.get("journal", {}), "server.journal")
    limits = _overlay(Limits(), server.get("limits", {}), "server.limits")

    settings = _env_overlay(settings, env, _ENV_FLOATS)
    settings = replace(
        settings, **{attr: env[key] for key, attr in _ENV_STRINGS.items() if key in env}
    )
    if "TOKENRELAY_PORT" in env:
        settings = replace(settings, port=_number("TOKENRELAY_PORT", env["TOKENRELAY_PORT"], int))
    if "TOKENRELAY_MAX_HEADERS" in env:
        settings = replace(settings, max_headers=_number("TOKENRELAY_MAX_HEADERS",
                                                         env["TOKENRELAY_MAX_HEADERS"], int))
    security = _parse_security(server, data.get("auth", {}), env)
    journal = _env_overlay(journal, env, _JOURNAL_ENV)
    limits = _env_overlay(limits, env, _LIMITS_ENV)

    providers = _parse_providers(data.get("providers", {}), env)
    models = _parse_models(data.get("models", {}), providers)
    passthrough = None
    if env.get("TOKENRELAY_UPSTREAM_URL"):
        providers["upstream"] = Provider(
            "upstream",
            env["TOKENRELAY_UPSTREAM_URL"].rstrip("/"),
            api_key=env.get("TOKENRELAY_UPSTREAM_API_KEY") or None,
        )
        passthrough = "upstream"
    if not providers:
        providers[SIMULATOR] = Provider(SIMULATOR, "")  # base_url filled in by the app
        models = simulator_models()

    for name, p in providers.items():
        if not p.proxy_from and p.base_url:  # no proxy key: the environment decides
            proxy, source = _env_proxy(p.base_url, env)
            providers[name] = replace(p, proxy=proxy, proxy_from=source)
    # Env tunables apply to every provider (handy for tests and single-upstream setups).
    providers = {
        name: replace(
            p,
            timeouts=_env_overlay(p.timeouts, env, _TIMEOUT_ENV),
            retry=_env_overlay(p.retry, env, _RETRY_ENV),
            breaker=_env_overlay(p.breaker, env, _BREAKER_ENV),
        )
        for name, p in providers.items()
    }
    default_model = settings.default_model or (next(iter(models)) if models else None)
    if SIMULATOR in providers and "sim-chat" in models and not settings.default_model:
        default_model = "sim-chat"
    if allowed_models is not None and default_model not in allowed_models:
        default_model = allowed_models[0] if allowed_models else None
    settings = replace(
        settings,
        providers=providers,
        models=models,
        passthrough_provider=passthrough,
        default_model=default_model,
        journal=journal,
        limits=limits,
        api_keys=api_keys,
        rate_limits=rate_limits,
        cors_origins=cors_origins,
        allowed_models=allowed_models,
        **security,
    )
    _check_security(settings)
    if overrides:
        settings = replace(settings, **overrides)
    if settings.heartbeat_s <= 0:
        raise ConfigError("Config 'heartbeat_s' must be positive.")
    if settings.redis_url and settings.journal_url == "memory://":
        settings = replace(settings, journal_url=settings.redis_url)
    return settings
