"""The tokenrelay command's help teaches (issue 14): every subcommand and option has a help
line, the top-level help lists the subcommands and points at the upstream variables, and
no reST markup leaks. ``serve`` warns before it exposes the upstream keys to a network."""

from __future__ import annotations

import argparse
import subprocess

import pytest

from support.processes import TOKENRELAY, serve_dry_run
from tokenrelay.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_subcommand_and_option_has_a_help_line() -> None:
    parser = build_parser()
    commands = _subparsers(parser)
    assert set(commands) == {"serve", "chat", "doctor", "simulate", "bench"}
    [group] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    described = {c.dest: c.help for c in group._choices_actions}
    missing = [name for name in commands if not (described.get(name) or "").strip()]
    for name, sub in {"tokenrelay": parser, **commands}.items():
        assert (sub.description or "").strip(), f"{name} has no description"
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def _help(*args: str) -> str:
    done = subprocess.run([str(TOKENRELAY), *args, "--help"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_top_level_help_lists_each_subcommand_with_a_sentence_and_the_upstream_variables() -> None:
    text = _help()
    for name in ("serve", "chat", "doctor", "simulate", "bench"):
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert len(line.split()) > 4, line  # a sentence, not just the name
    for variable in ("TOKENRELAY_UPSTREAM_URL", "TOKENRELAY_UPSTREAM_API_KEY",
                     "TOKENRELAY_DEFAULT_MODEL", "TOKENRELAY_CONFIG"):
        assert variable in text


def test_serve_help_mentions_the_upstream_variables() -> None:
    text = _help("serve")
    assert "TOKENRELAY_UPSTREAM_URL" in text and "TOKENRELAY_UPSTREAM_API_KEY" in text


@pytest.mark.parametrize("command", [(), ("serve",), ("chat",), ("doctor",), ("simulate",),
                                     ("bench",)])
def test_no_markup_leaks_into_help(command: tuple[str, ...]) -> None:
    text = _help(*command)
    assert "``" not in text and ":func:" not in text and ":class:" not in text


def _serve_warning(env: dict[str, str], *args: str) -> str:
    result = serve_dry_run(env, *args)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_binding_beyond_loopback_without_keys_warns():
    err = _serve_warning({}, "--host", "0.0.0.0", "--port", "1")
    assert "WARNING" in err and "no client API keys" in err
    assert "WARNING" not in _serve_warning({}, "--host", "127.0.0.1", "--port", "1")
    keyed = _serve_warning({"TOKENRELAY_API_KEYS": "a:long-enough-key"},
                           "--host", "0.0.0.0", "--port", "1")
    assert "WARNING" not in keyed
