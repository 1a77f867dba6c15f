"""No secret in logs, errors or command output; nothing the node creates is world-writable;
private keys others can read are reported."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import stat
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from node import config, permissions
from node.service import Node
from tests.certs import make_ca
from tests.conftest import RunningNode, free_port, node_toml, run_cli, wait_for, write_config
from tests.dicomgen import make_instance
from tests.scu import statuses, store

SMTP_USER = "pacs-mailer"
SMTP_PASSWORD = "Smtp-S3cret-5b9e"
WRONG_PASSWORD = "Wr0ng-Pg-S3cret-71a"


class QuotingMailServer:
    """A mail server that refuses every login and quotes the credentials it was sent back in
    its error (the worst a server can do)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.logins = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as stream:
                self._session(stream)

    def _session(self, stream: object) -> None:
        def say(line: str) -> None:
            stream.write(line.encode() + b"\r\n")  # type: ignore[attr-defined]
            stream.flush()  # type: ignore[attr-defined]

        say("220 quoting.example ESMTP")
        for raw in stream:  # type: ignore[attr-defined]
            words = raw.decode().strip().split()
            verb = words[0].upper() if words else ""
            if verb == "EHLO":
                say("250-quoting.example")
                say("250 AUTH PLAIN")
            elif verb == "AUTH":
                self.logins += 1
                sent = base64.b64decode(words[2]).decode().replace("\0", " ")
                say(f"535 5.7.8 login{sent} (sent as {words[2]}) rejected")
            elif verb == "QUIT":
                say("221 bye")
                return
            else:
                say("250 ok")

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def mail_server() -> Iterator[QuotingMailServer]:
    server = QuotingMailServer()
    yield server
    server.close()


def encoded(password: str) -> str:
    """Every character percent-encoded: the settings file's spelling differs from the user name
    the test role shares with its password, so a leak of it cannot hide behind the user name."""
    return "".join(f"%{b:02X}" for b in password.encode())


def postgres_url(url: str, password: str, port: int | None = None) -> str:
    u = make_url(url)
    return (f"postgresql+psycopg://{u.username}:{password}@{u.host}:{port or u.port}"
            f"/{u.database}")


# A PostgreSQL URL carries a password; a SQLite one has none to leak.
@pytest.mark.parametrize("new_db", ["postgresql"], indirect=True)
def test_no_password_in_logs_errors_or_command_output(
        new_db: Callable[[str], str], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        mail_server: QuotingMailServer) -> None:
    url = new_db("secret")
    real = make_url(url).password
    assert real
    spellings = {encoded(real): "the configured password", f":{real}@": "a password in a URL",
                 WRONG_PASSWORD: "the wrong password", SMTP_PASSWORD: "the SMTP password",
                 **{base64.b64encode(s.encode()).decode(): "the SMTP password in base64"
                    for s in (SMTP_PASSWORD, f"\0{SMTP_USER}\0{SMTP_PASSWORD}")}}
    caplog.set_level(logging.DEBUG)
    outputs: list[str] = []

    def settings_file(name: str, database_url: str) -> Path:
        return write_config(tmp_path / f"{name}.toml", node_toml(
            tmp_path / name, database_url, free_port(), f"""
[notify]
email_to = "pacs-admin@example.org"
smtp_host = "127.0.0.1"
smtp_port = {mail_server.port}
smtp_user = "{SMTP_USER}"
smtp_password = "{SMTP_PASSWORD}"
smtp_timeout = 5
"""))

    def cli(path: Path, *args: str, ok: bool = True) -> None:
        result = run_cli(path, *args)
        outputs.append(result.output + result.stderr + repr(result.exception))
        assert (result.exit_code == 0) is ok, result.output

    # A working node: start, a failing notification, the commands that show the database.
    good = settings_file("good", postgres_url(url, encoded(real)))
    running = Node(config.load(good))
    running.start()
    try:
        assert running.notifier is not None
        running.notifier.send("storage suspended", "test")
        assert wait_for(lambda: "cannot send the notification" in caplog.text, 10)
        assert mail_server.logins == 1
        for args in (("status",), ("status", "--json"), ("db", "upgrade"), ("db", "current"),
                     ("device", "list")):
            cli(good, *args)
        assert "postgresql+psycopg://" in outputs[2] and "***@" in outputs[2]  # db upgrade
    finally:
        running.stop()

    # Databases that refuse: a wrong password, nothing listening, a URL that does not parse.
    bad_urls = {"refused": postgres_url(url, WRONG_PASSWORD),
                "closed": postgres_url(url, WRONG_PASSWORD, port=free_port()),
                "typo": postgres_url(url, WRONG_PASSWORD).replace("://", "//"),
                "port": postgres_url(url, WRONG_PASSWORD).replace(":5432/", ":x5432/")}
    for name, database_url in bad_urls.items():
        path = settings_file(name, database_url)
        for args in (("status",), ("db", "upgrade"), ("db", "current")):
            cli(path, *args, ok=False)
            assert "cannot open the database" in outputs[-1], outputs[-1]
        with pytest.raises(Exception) as caught:
            Node(config.load(path)).start()
        outputs.append("".join(traceback.format_exception(caught.value)))

    logged = caplog.text
    # Last: serve puts its filter on the log handlers, the test's capture included.
    cli(settings_file("serve", bad_urls["refused"]), "serve", ok=False)

    for text in (*outputs, logged):
        for spelling, what in spellings.items():
            assert spelling not in text, f"{what} appears in:\n{text}"
    assert "***" in logged  # the mail server's quote was there, masked


def test_nothing_the_node_creates_is_world_writable(make_node: Callable[..., RunningNode],
                                                    tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        node = make_node(name="perm", hierarchy="recollect_timeout = 5\n", empty_db=True)
        assert node.cli("partition", "edit", "PACSNODE", "--track-deleted").exit_code == 0
        study = make_instance()
        other = make_instance(study_uid=study.StudyInstanceUID,
                              series_uid=study.SeriesInstanceUID)
        assert statuses(store(node.port, [study, other])) == [0, 0]
        # Delete (kept: the deleted folder and its manifest), restore, and the directory
        # export (dotcom.json).
        deleted = node.cli("study", "delete", study.StudyInstanceUID, "--yes")
        assert deleted.exit_code == 0, deleted.output
        [record] = json.loads(node.cli("deleted", "list", "--json").output)
        assert node.cli("deleted", "restore", str(record["id"])).exit_code == 0
        assert node.cli("recollect").exit_code == 0
        assert (node.settings.data_dir / "dotcom.json").is_file()
    finally:
        os.umask(previous)

    roots = [node.settings.data_dir, node.settings.storage_dir]
    database = Path(make_url(node.settings.database_url).database or "")
    created = [p for root in roots for p in [root, *root.rglob("*")]]
    if node.settings.database_url.startswith("sqlite"):
        created += list(database.parent.glob(database.name + "*"))
    assert any(p.suffix == ".dcm" for p in created)
    writable = [f"{p} {stat.S_IMODE(p.lstat().st_mode):03o}" for p in created
                if p.lstat().st_mode & stat.S_IWOTH]
    assert not writable


def test_a_private_key_others_can_read_is_reported(make_node: Callable[..., RunningNode],
                                                   tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    ca = make_ca(tmp_path / "pki", "hospital")
    issued = ca.issue(tmp_path / "pki", "keys")
    issued.key.chmod(0o644)
    caplog.set_level(logging.WARNING, logger="node.permissions")
    node = make_node(name="keys", hierarchy=f'tls_ca = "{ca.path}"\ntls_cert = "{issued.cert}"\n'
                                            f'tls_key = "{issued.key}"\n')
    assert f"hierarchy.tls_key: the private key {issued.key}" in caplog.text
    assert "mode 644" in caplog.text
    issued.key.chmod(0o600)
    assert permissions.warn_about_key_files(node.settings) == []
