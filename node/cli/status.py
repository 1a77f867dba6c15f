"""`pacsnode status`: disk usage against the watermarks, suspended storage, last purge, queue."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import typer
from sqlalchemy import func, select

from node.cli.common import ConfigOption, JsonOption, database, print_json, table
from node.config import Settings
from node.db.models import DeletedStudy, Partition, Study
from node.forwarding import admin
from node.storage.monitor import load_state
from node.storage.space import StorageGuard


def _age(iso: str) -> str:
    if not iso:
        return "never"
    seconds = (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()
    return f"{iso} ({seconds:.0f} s ago)"


def _filesystems(settings: Settings, folders: dict[str, list[str]],
                 reported: dict[str, Any]) -> list[dict[str, Any]]:
    """Measured now, by this command; purge state as the node last reported it."""
    guard = StorageGuard(settings.storage_dir, settings.storage.critical_watermark)
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for device, (path, usage, suspended) in guard.refresh(list(folders)).items():
        node_view = reported.get(str(path), {})
        out.append({
            "path": str(path), "total": usage.total, "available": usage.available,
            "percent_used": round(usage.percent_used, 2), "suspended": suspended,
            "purging": node_view.get("purging", False),
            "waiting": node_view.get("waiting", ""),
            "partitions": [ae for folder in guard.folders_on(device)
                           for ae in folders.get(folder, [])]})
    return out


def status(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Disk usage against the watermarks, whether storage is suspended, the last purge, and the
    forwarding queue."""
    with database(config) as (settings, db), db.session() as session:
        folders: dict[str, list[str]] = {}
        for ae, folder in session.execute(select(Partition.ae_title, Partition.folder)):
            folders.setdefault(folder, []).append(ae)
        studies = session.scalar(select(func.count()).select_from(Study)) or 0
        deleted = session.scalar(select(func.count()).select_from(DeletedStudy)) or 0
        waiting, failed = admin.depth(session)
        state = load_state(session)
    s = settings.storage
    reported = {f.path: asdict(f) for f in state.filesystems} if state else {}
    data: dict[str, Any] = {
        "node": settings.node.name,
        "storage_root": str(settings.storage_dir),
        "watermarks": {"low": s.low_watermark, "high": s.high_watermark,
                       "critical": s.critical_watermark},
        "auto_purge": s.auto_purge,
        "filesystems": _filesystems(settings, folders, reported),
        "studies": studies, "deleted_studies": deleted,
        "queue": {"waiting": waiting, "failed": failed},
        "last_check": state.checked_at if state else "",
        "last_purge": asdict(state.last_purge) if state and state.last_purge else None,
    }
    if as_json:
        print_json(data)
        return
    typer.echo(f"node {data['node']}: {studies} studies, {deleted} deleted studies kept; "
               f"forwarding queue {waiting} waiting, {failed} failed")
    typer.echo(f"watermarks: purge above {s.high_watermark:g}% used down to "
               f"{s.low_watermark:g}%, storage suspended at {s.critical_watermark:g}%"
               + ("" if s.auto_purge else " (auto-purge off)"))
    table("Storage", ["filesystem", "used", "free", "size", "storage", "purge", "partitions"],
          [[f["path"], f"{f['percent_used']:.1f}%", _size(f["available"]), _size(f["total"]),
            "SUSPENDED" if f["suspended"] else "accepting",
            ("purging" + (f" (waiting: {f['waiting']})" if f["waiting"] else ""))
            if f["purging"] else "-", ", ".join(f["partitions"])]
           for f in data["filesystems"]])
    typer.echo(f"last storage check by the node: {_age(data['last_check'])}")
    last = data["last_purge"]
    if last:
        typer.echo(f"last purge: {last['at']} on {last['path']}: {last['studies']} studies, "
                   f"{_size(last['bytes'])} freed; {last['stopped']}")
    else:
        typer.echo("last purge: never")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
