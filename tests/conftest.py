"""Shared fixtures: a real node on loopback, on SQLite and on PostgreSQL, and DICOM helpers."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from typer.testing import CliRunner, Result

from hierarchy.cli import app
from hierarchy.plane import ControlPlane
from node import config
from node.db import migrate
from node.db.database import Database
from node.service import Node
from node.storage import files

PG_URL = os.environ.get("PACSNODE_TEST_PG_URL", "")
REQUIRE_PG = os.environ.get("PACSNODE_REQUIRE_POSTGRES") == "1"
REQUIRE_DCMTK = os.environ.get("PACSNODE_REQUIRE_DCMTK") == "1"
DCMTK_BIN = Path("/usr/bin")  # never the venv's pynetdicom tools of the same names


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and never handed out before in this session: the kernel may
    give a closed port out again at once, and a tree of nodes takes a dozen before binding any
    (a node once got another node's control port as its DICOM port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def listening(port: int) -> bool:
    """Something accepts connections on the loopback port."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_listening(port: int, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Until `proc` accepts connections on `port`; fails if it exits first (with its output,
    when that is piped) or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout is not None else ""
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}:\n{output}")
        if listening(port):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port} after {timeout} s")


def _pg_admin_ok() -> bool:
    if not PG_URL:
        return False
    try:
        engine = create_engine(PG_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


_PG_AVAILABLE: bool | None = None
_counter = itertools.count()


def _pg_available() -> bool:
    global _PG_AVAILABLE
    if _PG_AVAILABLE is None:
        _PG_AVAILABLE = _pg_admin_ok()
    return _PG_AVAILABLE


class MigratedTemplates:
    """One migrated database per backend for the whole session: a node's database is a copy.

    Running the migrations costs a third of a second per database on either backend, and the
    suite starts hundreds of nodes. The migrations themselves are tested on empty databases
    (`db_url`, tests/integration/test_migrations.py), and `pacsnode serve` on an empty one.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._sqlite: Path | None = None
        self._postgresql: str | None = None

    def sqlite_copy(self, target: Path) -> None:
        if self._sqlite is None:
            path = self.directory / "template.db"
            database = Database(f"sqlite:///{path}")
            migrate.upgrade(database.engine)
            database.dispose()
            # The last connection's close folds the WAL into the file copied below.
            assert not Path(f"{path}-wal").exists(), "the template's WAL was left behind"
            self._sqlite = path
        shutil.copyfile(self._sqlite, target)

    def postgresql(self, admin: Engine) -> str:
        """The template's name (CREATE DATABASE ... TEMPLATE it)."""
        if self._postgresql is None:
            name = f"pacsnode_template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            database = Database(make_url(PG_URL).set(database=name)
                                .render_as_string(hide_password=False))
            migrate.upgrade(database.engine)
            database.dispose()  # a template must have no connections when it is copied
            self._postgresql = name
        return self._postgresql

    def drop(self) -> None:
        if self._postgresql is not None:
            admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
            _drop_database(admin, self._postgresql)
            admin.dispose()


@pytest.fixture(scope="session")
def migrated_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MigratedTemplates]:
    templates = MigratedTemplates(tmp_path_factory.mktemp("templates"))
    yield templates
    templates.drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def new_db(request: pytest.FixtureRequest, tmp_path: Path,
           migrated_templates: MigratedTemplates) -> Iterator[Callable[..., str]]:
    """Makes fresh databases of each backend (one per node in multi-node tests): migrated to
    the head revision, or empty with `migrated=False`."""
    created: list[str] = []
    if request.param == "postgresql" and not _pg_available():
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL is required but not reachable at {PG_URL!r}")
        pytest.skip("PostgreSQL not configured (set PACSNODE_TEST_PG_URL; scripts/test.sh does)")
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT") if request.param != "sqlite" \
        else None

    def make(name: str = "index", migrated: bool = True) -> str:
        if admin is None:
            path = tmp_path / (name + ".db")
            if migrated:
                migrated_templates.sqlite_copy(path)
            return f"sqlite:///{path}"
        db = f"pacsnode_t{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
        template = f' TEMPLATE "{migrated_templates.postgresql(admin)}"' if migrated else ""
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db}"{template}'))
        created.append(db)
        return make_url(PG_URL).set(database=db).render_as_string(hide_password=False)

    yield make
    if admin is not None:
        for db in created:
            _drop_database(admin, db)
        admin.dispose()


def _drop_database(admin: Engine, name: str) -> None:
    """Drop a test database; a busy one (e.g. autovacuum at work) is retried, then left."""
    for attempt in range(10):
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except SQLAlchemyError as exc:
            if attempt == 9:
                warnings.warn(f"test database {name} left behind: {exc}", stacklevel=2)
                return
            time.sleep(0.5)


@pytest.fixture
def db_url(new_db: Callable[..., str]) -> str:
    """An empty database (no tables): what a node first started on it migrates."""
    return new_db("index", migrated=False)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite index of its own, without a node."""
    database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    migrate.upgrade(database.engine)
    yield database
    database.dispose()


def write_config(path: Path, settings_toml: str) -> Path:
    path.write_text(settings_toml, encoding="utf-8")
    return path


@dataclass
class RunningNode:
    node: Node
    settings: config.Settings
    config_path: Path
    port: int

    @property
    def control(self) -> str:
        """The control plane's address (nodes started with a [hierarchy] section)."""
        return self.settings.hierarchy.control_listen

    @property
    def db(self) -> Database:
        assert self.node.db is not None
        return self.node.db

    @property
    def storage(self) -> Path:
        return self.settings.storage_dir

    def cli(self, *args: str) -> Result:
        return run_cli(self.config_path, *args)


def node_toml(data_dir: Path, db: str, port: int, extra: str = "", bootstrap: bool = True,
              storage_dir: Path | None = None) -> str:
    partition = f"[bootstrap_partition]\nport = {port}\n" if bootstrap else ""
    storage = f'storage_dir = "{storage_dir}"' if storage_dir else ""
    return f"""
[node]
data_dir = "{data_dir}"
{storage}
database_url = "{db}"
listen_host = "127.0.0.1"
partition_poll_seconds = 0.2
shutdown_grace_seconds = 5

{partition}
{extra}
"""


@pytest.fixture
def make_node(tmp_path: Path, new_db: Callable[..., str]) -> Iterator[object]:
    """Start a node (in this process) on a free loopback port; stopped after the test."""
    started: list[Node] = []

    def start(extra: str = "", name: str = "node", hierarchy: str | None = None,
              ae_title: str | None = None, storage_dir: Path | None = None,
              empty_db: bool = False) -> RunningNode:
        """`hierarchy`: lines for the [hierarchy] section; the node then also runs its control
        plane (node_id = name, on a free loopback port). `empty_db`: the node creates its
        database's tables (and, on SQLite, the file) itself."""
        port = free_port()
        if ae_title is not None:
            extra += f"\n[bootstrap_partition]\nae_title = \"{ae_title}\"\nport = {port}\n"
        if hierarchy is not None:
            extra += (f"\n[hierarchy]\nnode_id = \"{name}\"\n"
                      f"control_listen = \"127.0.0.1:{free_port()}\"\n{hierarchy}\n")
        path = write_config(tmp_path / f"{name}.toml",
                            node_toml(tmp_path / name, new_db(name, not empty_db), port, extra,
                                      bootstrap=ae_title is None, storage_dir=storage_dir))
        settings = config.load(path)
        if "association_processes" not in extra:
            # A node in the test's process serves its associations there (the default, one
            # process per core, starts more: tests that are about them ask for them, and
            # `pacsnode serve` in the interop tests runs as installed).
            settings.dicom.association_processes = 1
        node = Node(settings, [ControlPlane(settings)] if hierarchy is not None else [])
        node.start()
        started.append(node)
        return RunningNode(node, settings, path, port)

    yield start
    stop_nodes(started)


def stop_nodes(started: list[Node]) -> None:
    """Stop nodes a test started, the last started first: a child's heartbeat associations to
    its parent then close with it, instead of the parent waiting its shutdown grace (5 s)."""
    for node in reversed(started):
        node.stop()


@pytest.fixture
def node(make_node: object) -> RunningNode:
    return make_node()  # type: ignore[operator]


_runner = CliRunner()


def run_cli(config_path: Path, *args: str) -> Result:
    return _runner.invoke(app, [*args, "--config", str(config_path)])


@pytest.fixture
def dcmtk() -> Path:
    if not (DCMTK_BIN / "storescu").exists():
        if REQUIRE_DCMTK:
            pytest.fail("DCMTK is required but /usr/bin/storescu is missing")
        pytest.skip("DCMTK not installed (apt-get install dcmtk; scripts/test.sh does)")
    return DCMTK_BIN


def dcmtk_env() -> dict[str, str]:
    # DCMTK stalls ~40 ms per small message on loopback without TCP_NODELAY.
    return {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def synced_directories(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every directory `files.fsync_dir` fsyncs (for real) from now on, in order."""
    calls: list[Path] = []
    original = files.fsync_dir

    def recording(path: Path) -> None:
        calls.append(path)
        original(path)

    monkeypatch.setattr(files, "fsync_dir", recording)
    return calls


def stored_files(storage: Path) -> list[Path]:
    """The archive's files; the temporary ones in .incoming are `incoming_files`."""
    incoming = storage / ".incoming"
    return sorted(p for p in storage.rglob("*") if p.is_file() and incoming not in p.parents)


def incoming_files(storage: Path) -> list[Path]:
    """The temporary files in .incoming (not the node's lock)."""
    return files.temporary_files(storage)


def incoming_emptied(storage: Path, timeout: float = 5.0) -> bool:
    """`.incoming` empties: a direct store's temporary file is kept until its directory's
    batched fsync (storage/dirsync.py), a fraction of a second after the answer."""
    return wait_for(lambda: incoming_files(storage) == [], timeout)


@pytest.fixture(autouse=True)
def _no_stray_pacsnode_data() -> Iterator[None]:
    yield
    # A test that fell back to ./pacsnode-data would litter the checkout.
    stray = Path.cwd() / "pacsnode-data"
    if stray.exists() and os.environ.get("CI") == "true":
        shutil.rmtree(stray)
