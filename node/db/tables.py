"""A model's Core table, for statements that bypass the ORM's unit of work."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table

from node.db.models import Base


def table(model: type[Base]) -> Table:
    """`model.__table__` as the Table it is: DeclarativeBase types it as any FromClause, which
    has no name, primary key or insert()."""
    return cast(Table, model.__table__)
