"""Device categories: members share a connection limit (docs/how-to/forwarding.md)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db.models import Category, Device
from node.partitions import AdminError


def add(session: Session, name: str, max_connections: int) -> Category:
    name = name.strip()
    if not name or len(name) > 64:
        raise AdminError("category name must be 1 to 64 characters")
    if max_connections < 1:
        raise AdminError("max connections must be at least 1")
    if session.scalar(select(Category.id).where(Category.name == name)) is not None:
        raise AdminError(f"a category named {name!r} already exists")
    category = Category(name=name, max_connections=max_connections)
    session.add(category)
    session.flush()
    return category


def get(session: Session, name: str) -> Category:
    category = session.scalar(select(Category).where(Category.name == name))
    if category is None:
        raise AdminError(f"no category named {name!r}")
    return category


def edit(session: Session, name: str, max_connections: int) -> None:
    if max_connections < 1:
        raise AdminError("max connections must be at least 1")
    get(session, name).max_connections = max_connections


def delete(session: Session, name: str) -> None:
    session.delete(get(session, name))  # members keep working, without a shared limit


def listing(session: Session) -> list[tuple[Category, int]]:
    members = dict(session.execute(
        select(Device.category_id, func.count()).group_by(Device.category_id)).all())
    return [(c, members.get(c.id, 0))
            for c in session.scalars(select(Category).order_by(Category.name))]
