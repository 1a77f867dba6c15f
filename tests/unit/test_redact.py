"""Secrets masked in URLs and free text; the umask and key-mode decisions."""

from __future__ import annotations

import base64
import logging
import stat
import sys

import pytest

from node.permissions import exposed, tightened
from node.redact import MASK, RedactingFilter, redact_url, scrub, smtp_secrets, url_secrets


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg://pacs:s3cr%40t/x@db.lan:5432/pacs",
     "postgresql+psycopg://pacs:***@db.lan:5432/pacs"),
    ("postgresql://pacs@db.lan/pacs", "postgresql://pacs@db.lan/pacs"),  # no password
    ("postgresql://db.lan/pacs?user=pacs&password=s3cret&sslmode=require",
     "postgresql://db.lan/pacs?user=pacs&password=***&sslmode=require"),
    ("sqlite:////var/lib/pacs@node/pacsnode.db", "sqlite:////var/lib/pacs@node/pacsnode.db"),
    ("postgresql+psycopg//pacs:s3cret@db.lan/pacs", "***@db.lan/pacs"),  # a typo: not parsed
    ("", ""),
])
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_url_secrets_are_found_as_written_and_decoded() -> None:
    assert url_secrets("postgresql://pacs:s3cr%40t@db/x") == ["s3cr%40t", "s3cr@t"]
    assert url_secrets("postgresql://db/x?password=a%20b") == ["a%20b", "a b"]
    assert url_secrets("postgresql://pacs@db/x") == []
    assert url_secrets("sqlite:///data/pacsnode.db") == []


def test_scrub_masks_urls_and_known_secrets_in_any_text() -> None:
    text = ("cannot connect to postgresql://pacs:hunter22@db/x: server said 'bad password"
            " hunter22' (535, b'AUTH failed for aHVudGVyMjI=')")
    clean = scrub(text, ["hunter22", base64.b64encode(b"hunter22").decode(), "ab"])
    assert "hunter22" not in clean and "aHVudGVyMjI=" not in clean
    assert clean.count(MASK) == 3
    assert "ab" in scrub("about", ["ab"])  # too short to hunt in free text


@pytest.mark.parametrize(("text", "clean"), [
    # The secret as a secret: quoted, a parameter, a word of its own.
    ("FATAL: password \"pacs\" rejected", f"FATAL: password \"{MASK}\" rejected"),
    ("connect(password=pacs, host=db)", f"connect(password={MASK}, host=db)"),
    ("secret: pacs", f"secret: {MASK}"),
    # Inside a longer word it is not the secret: names stay readable.
    ("pacsnode started on node pacsnode-site1", "pacsnode started on node pacsnode-site1"),
    ("partition PACS2 and pacs_old", "partition PACS2 and pacs_old"),
])
def test_scrub_masks_a_secret_only_where_it_stands_alone(text: str, clean: str) -> None:
    assert scrub(text, ["pacs"]) == clean


def test_scrub_masks_secrets_that_begin_or_end_with_punctuation() -> None:
    assert scrub("auth failed: s3cr@t!", ["s3cr@t!"]) == f"auth failed: {MASK}"
    assert scrub("x=!pw1 y", ["!pw1"]) == f"x={MASK} y"


def test_smtp_secrets_include_what_auth_sends() -> None:
    found = smtp_secrets("pacs", "m@il-pw")
    assert found[0] == "m@il-pw"
    assert base64.b64encode(b"\0pacs\0m@il-pw").decode() in found
    assert smtp_secrets("pacs", "") == []


def test_the_log_filter_scrubs_messages_and_tracebacks() -> None:
    try:
        raise RuntimeError("login with hunter22 refused")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "connecting to %s failed",
                                   ("postgresql://u:hunter22@db/x",), sys.exc_info())
    assert RedactingFilter(["hunter22"]).filter(record)
    formatted = logging.Formatter().format(record)
    assert "hunter22" not in formatted
    assert "postgresql://u:***@db/x" in formatted and "RuntimeError" in formatted


def test_umask_and_key_modes() -> None:
    assert tightened(0o000) == 0o002
    assert tightened(0o022) == 0o022
    assert tightened(0o007) == 0o007
    assert tightened(0o002) == 0o002  # group write stays the administrator's choice
    assert not exposed(stat.S_IFREG | 0o600)
    assert not exposed(stat.S_IFREG | 0o400)
    assert exposed(stat.S_IFREG | 0o640)
    assert exposed(stat.S_IFREG | 0o604)
    assert exposed(stat.S_IFREG | 0o620)
