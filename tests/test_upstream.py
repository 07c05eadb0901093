"""Pure parts of the upstream client: Retry-After parsing and provider error messages."""

from __future__ import annotations

import email.utils

import pytest

from tokenrelay.upstream import _error_message, parse_retry_after, status_message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": " 3 "}, 3.0),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the precise one wins
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({"retry-after": "whenever"}, None),
        ({}, None),
    ],
)
def test_retry_after_seconds_and_milliseconds(headers, expected):
    assert parse_retry_after(headers) == expected


def test_retry_after_http_date():
    now = 1_800_000_000.0
    later = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": later}, now=now) == pytest.approx(30, abs=1)
    earlier = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"retry-after": earlier}, now=now) == 0.0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error": {"message": "quota exceeded", "type": "x"}}', "quota exceeded"),
        (b'{"error": "model overloaded"}', "model overloaded"),
        (b'{"detail": "not found"}', "not found"),
        (b"plain text failure", "plain text failure"),
        (b"", ""),  # nothing said: the caller names the status, once
        (b"[1, 2]", ""),
    ],
)
def test_provider_error_message(body, expected):
    assert _error_message(body, 502) == expected


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/v1/chat/completions", "set base_url to http://h:1/v1"),
        ("https://api.example.com/v1/chat/completions?key=sk-x", "set base_url to "
         "https://api.example.com/v1"),
    ],
)
def test_redirect_message_resolves_a_relative_location_and_drops_the_query(location, expected):
    message = status_message(308, "", "http://h:1/chat/completions", "POST", "http://h:1",
                             location)
    assert message.endswith(expected) and "key=" not in message
