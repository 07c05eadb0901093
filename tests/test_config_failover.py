"""Failover settings of issue 15 in the TOML config: parsed, typed, and errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenrelay.config import BreakerPolicy, load_settings
from tokenrelay.errors import ConfigError

BASE = """
[providers.p]
base_url = "http://127.0.0.1:9/v1"
{provider}
[models.m]
provider = "p"
{model}
[models.big]
provider = "p"
"""


def load(tmp_path: Path, provider: str = "", model: str = "", **env: str):
    path = tmp_path / "c.toml"
    path.write_text(BASE.format(provider=provider, model=model), encoding="utf-8")
    return load_settings(path, environ=env)


def test_defaults_change_nothing(tmp_path: Path) -> None:
    s = load(tmp_path)
    route, provider = s.models["m"], s.providers["p"]
    assert provider.breaker == BreakerPolicy(failures=5, cooldown_s=30.0)
    assert (provider.supports_prefill, provider.prefill_flag) == (False, "")
    assert route.first_token is None and not route.retry_on_timeout
    assert route.context_fallbacks == () and not route.continue_after_cut
    assert route.supports_prefill is None


def test_every_failover_setting_is_read(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        provider='breaker = { failures = 2, cooldown_s = 5 }\nsupports_prefill = true\n'
                 'prefill_flag = "prefix"',
        model='timeouts = { first_token = 7.5 }\nretry_on_timeout = true\n'
              'context_fallbacks = ["big"]\ncontinue_after_cut = true\nsupports_prefill = false',
    )
    route, provider = s.models["m"], s.providers["p"]
    assert provider.breaker == BreakerPolicy(failures=2, cooldown_s=5.0)
    assert (provider.supports_prefill, provider.prefill_flag) == (True, "prefix")
    assert (route.first_token, route.retry_on_timeout, route.context_fallbacks,
            route.continue_after_cut, route.supports_prefill) == (7.5, True, ("big",), True, False)


def test_the_breaker_can_be_set_for_every_provider_from_the_environment(tmp_path: Path) -> None:
    s = load(tmp_path, TOKENRELAY_BREAKER_FAILURES="0", TOKENRELAY_BREAKER_COOLDOWN_S="2")
    assert s.providers["p"].breaker == BreakerPolicy(failures=0, cooldown_s=2.0)


@pytest.mark.parametrize(("provider", "model", "key"), [
    ("breaker = { failures = -1 }", "", "providers.p.breaker.failures"),
    ("breaker = { tries = 3 }", "", "providers.p.breaker.tries"),
    ('supports_prefill = "yes"', "", "providers.p.supports_prefill"),
    ('prefill_flag = "magic"', "", "providers.p.prefill_flag"),
    ("", 'context_fallbacks = ["nope"]', "models.m.context_fallbacks"),
    ("", 'context_fallbacks = "big"', "models.m.context_fallbacks"),
    ("", "timeouts = { idle = 3 }", "models.m.timeouts"),
    ("", 'timeouts = { first_token = "x" }', "models.m.timeouts.first_token"),
    ("", "continue_after_cut = 1", "models.m.continue_after_cut"),
    ("", 'supports_prefill = "no"', "models.m.supports_prefill"),
])
def test_bad_values_fail_at_startup_naming_the_key(tmp_path: Path, provider: str, model: str,
                                                   key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, provider, model)
    assert key in str(caught.value)
