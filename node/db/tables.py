"""Core statements on the models' tables, typed: a model's Table, and the rows a statement
run by Session.execute changed."""

from __future__ import annotations

from typing import cast

from sqlalchemy import CursorResult, Result, Table

from node.db.models import Base


def table(model: type[Base]) -> Table:
    """`model.__table__` as the Table it is: DeclarativeBase types it as any FromClause, which
    has no name, primary key or insert()."""
    return cast(Table, model.__table__)


def rowcount(result: Result) -> int:
    """The rows an UPDATE or DELETE matched. Session.execute returns a CursorResult for
    them, but its type says Result, which has no rowcount."""
    assert isinstance(result, CursorResult)
    return result.rowcount
