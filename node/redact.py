"""Secrets stay out of log lines, error messages and command output.

The settings hold two secrets: the password in node.database_url and notify.smtp_password.
What the node prints about its database goes through `redact_url`; text it did not write
itself (a driver's or a mail server's error, a traceback) goes through `scrub` with the
settings' secrets, and `pacsnode serve` puts `RedactingFilter` on its log handlers for what
other libraries log.
"""

from __future__ import annotations

import base64
import logging
import re
import urllib.parse
from collections.abc import Iterable

from node.config import Settings

MASK = "***"
# Free text is not searched for shorter secrets: masking every "ab" would garble messages
# (a password in a URL is masked by its position, whatever its length).
SHORTEST = 4

# scheme://user:password@ (SQLAlchemy's own grammar: the password runs to the first '@').
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][\w+.-]*://[^\s:/@]*:)(?P<secret>[^\s@]*)@")
_SCHEME = re.compile(r"[A-Za-z][\w+.-]*://")
# libpq and SQLAlchemy also take the password as a query parameter.
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|sslpassword)=)(?P<secret>[^&\s]*)",
                    re.IGNORECASE)


def _mask(match: re.Match[str]) -> str:
    tail = "@" if match.re is _USERINFO else ""
    return f"{match['head']}{MASK}{tail}"


def _malformed_userinfo(url: str) -> str | None:
    """What precedes the host in a URL without "scheme://" (a typo SQLAlchemy refuses): it may
    hold a password. SQLite URLs have none (an '@' there is part of a path)."""
    if _SCHEME.match(url) or url.startswith("sqlite") or "@" not in url:
        return None
    return url[:url.rindex("@")]


def redact_url(url: str) -> str:
    """`url` with its password masked, as it can be shown anywhere."""
    userinfo = _malformed_userinfo(url)
    if userinfo is not None:
        return MASK + url[len(userinfo):]
    return _USERINFO.sub(_mask, _QUERY.sub(_mask, url))


def url_secrets(url: str) -> list[str]:
    """The passwords in `url`, as written and decoded (what a driver or server would echo)."""
    found = [m["secret"] for m in _USERINFO.finditer(url)]
    found += [m["secret"] for m in _QUERY.finditer(url)]
    userinfo = _malformed_userinfo(url)
    if userinfo is not None:
        found.append(userinfo)
    found += [urllib.parse.unquote(s) for s in found]
    return list(dict.fromkeys(s for s in found if s))


def smtp_secrets(user: str, password: str) -> list[str]:
    """The SMTP password, and as AUTH PLAIN and AUTH LOGIN send it (base64), should a mail
    server quote it back in an error."""
    if not password:
        return []
    return [password, *(base64.b64encode(v.encode()).decode()
                        for v in (f"\0{user}\0{password}", password))]


def known_secrets(settings: Settings) -> list[str]:
    """Every secret the settings hold, for `scrub`."""
    n = settings.notify
    return [*url_secrets(settings.database_url), *smtp_secrets(n.smtp_user, n.smtp_password)]


def _as_token(secret: str) -> re.Pattern[str]:
    """`secret` where it stands on its own: not inside a longer word (a password `pacs` must
    not turn the node's name `pacsnode` into `***node`)."""
    head = r"(?<!\w)" if re.match(r"\w", secret) else ""
    tail = r"(?!\w)" if re.match(r"\w", secret[-1]) else ""
    return re.compile(head + re.escape(secret) + tail)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with URL passwords and each of `secrets` masked where it stands on its own."""
    text = _USERINFO.sub(_mask, _QUERY.sub(_mask, text))
    # Longest first: a secret that contains another is masked whole.
    for secret in sorted({s for s in secrets if len(s) >= SHORTEST}, key=len, reverse=True):
        if secret in text:
            text = _as_token(secret).sub(MASK, text)
    return text


class RedactingFilter(logging.Filter):
    """For a log handler: every record it emits, traceback included, is scrubbed."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # Formatters use exc_text when it is set, so the scrubbed text is what they print.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info, self.secrets)
        return True
