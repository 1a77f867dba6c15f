"""`pacsnode activity`: the DICOM activity log, newest first."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Annotated, Any

import typer
from rich.markup import escape

from node.activity import KINDS, OUTCOMES, query
from node.cli.common import ConfigOption, JsonOption, database, fail, print_json, table
from node.db.models import Activity

_RELATIVE = re.compile(r"(\d+)\s*(s|m|min|h|d|w)", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "min": "minutes", "h": "hours", "d": "days",
          "w": "weeks"}
TIME_HELP = ("ISO date or date-time (local time unless it has an offset, e.g. 2026-01-31 or "
             "2026-01-31T08:00), or an age such as 30m, 2h, 3d, 1w")


def parse_time(value: str, now: datetime | None = None, local: tzinfo | None = None
               ) -> datetime:
    """An absolute ISO 8601 date/time or a relative age ('2h': two hours before `now`), as an
    aware UTC datetime; ValueError with the accepted forms otherwise.

    A date or time without an offset is the administrator's wall clock (`local`, default the
    system's time zone); the log itself is kept in UTC.
    """
    text = value.strip()
    now = now or datetime.now(UTC)
    relative = _RELATIVE.fullmatch(text)
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2).lower()
        return now - timedelta(**{_UNITS[unit]: amount})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{value!r} is neither an ISO date/time nor an age: use {TIME_HELP}"
                         ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=local) if local is not None else when.astimezone()
    return when.astimezone(UTC)


def _option_time(option: str, value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        fail(f"{option}: {exc}")


def _utc(at: datetime) -> datetime:
    # SQLite hands back naive datetimes; they are UTC.
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def as_dict(row: Activity) -> dict[str, Any]:
    return {"at": _utc(row.at).isoformat(), "kind": row.kind, "partition": row.partition,
            "calling_ae": row.calling_ae, "called_ae": row.called_ae, "peer": row.peer,
            "study_instance_uid": row.study_instance_uid, "count": row.count,
            "failed": row.failed, "outcome": row.outcome, "detail": row.detail}


def activity(
    since: Annotated[str | None, typer.Option(help=f"From: {TIME_HELP}.",
                                              show_default=False)] = None,
    until: Annotated[str | None, typer.Option(help="Up to: same forms as --since.",
                                              show_default=False)] = None,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", help=f"Only these kinds (repeatable): {', '.join(KINDS)}.",
        show_default=False)] = None,
    ae: Annotated[str, typer.Option("--ae", help="Calling AE, called AE or partition.")] = "",
    study: Annotated[str, typer.Option("--study", help="Study Instance UID.")] = "",
    outcome: Annotated[str, typer.Option(metavar="|".join(OUTCOMES),
                                         help="Only rows with this outcome.")] = "",
    limit: Annotated[int, typer.Option(help="Newest N rows.")] = 100,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """DICOM activity: associations, rejects, stores, queries, retrieves, forwards, purges."""
    start = _option_time("--since", since)
    end = _option_time("--until", until)
    kinds = [k.strip().lower() for k in kind or []]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        fail(f"--kind {unknown[0]!r} is not one of {', '.join(KINDS)}")
    if outcome and outcome.strip().lower() not in OUTCOMES:
        fail(f"--outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
    if limit < 1:
        fail("--limit must be at least 1")
    if start is not None and end is not None and end < start:
        fail(f"--until ({end.isoformat()}) is before --since ({start.isoformat()})")
    with database(config) as (_settings, db), db.session() as session:
        rows = [as_dict(row) for row in query(
            session, since=start, until=end, kinds=kinds, ae_title=ae.strip(),
            study_instance_uid=study.strip(), outcome=outcome.strip().lower(), limit=limit)]
    if as_json:
        print_json(rows)
        return
    # Values come from the network (AE titles, error comments): never read them as markup.
    table("DICOM activity", ["time", "kind", "partition", "calling AE", "called AE", "peer",
                             "study", "count", "failed", "outcome", "detail"],
          [[datetime.fromisoformat(r["at"]).astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            *(escape(str(r[k])) for k in ("kind", "partition", "calling_ae", "called_ae",
                                          "peer", "study_instance_uid")),
            r["count"], r["failed"], r["outcome"], escape(r["detail"][:80])] for r in rows])
