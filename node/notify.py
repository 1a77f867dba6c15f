"""E-mail notifications to the administrator (storage suspended / resumed), sent off-thread."""

from __future__ import annotations

import logging
import queue
import smtplib
import socket
import threading
from email.message import EmailMessage

from node.config import NotifySettings
from node.redact import scrub, smtp_secrets

log = logging.getLogger(__name__)


class Notifier:
    """Sends each message in a background thread, so a slow mail server never stalls a store."""

    def __init__(self, settings: NotifySettings, node_name: str) -> None:
        self.settings = settings
        self.node_name = node_name
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return bool(self.settings.email_to and self.settings.smtp_host)

    def start(self) -> None:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(self.settings.smtp_timeout + 1)
            self._thread = None

    def send(self, subject: str, body: str) -> None:
        if self._thread is not None:
            self._queue.put((subject, body))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            subject, body = item
            try:
                self._deliver(subject, body)
                self.sent += 1
            except (OSError, smtplib.SMTPException) as exc:
                # A mail server may quote what it was sent, credentials included.
                reason = scrub(str(exc), smtp_secrets(self.settings.smtp_user,
                                                      self.settings.smtp_password))
                log.error("cannot send the notification %r to %s via %s:%d: %s", subject,
                          self.settings.email_to, self.settings.smtp_host,
                          self.settings.smtp_port, reason)

    def _deliver(self, subject: str, body: str) -> None:
        s = self.settings
        message = EmailMessage()
        message["From"] = s.email_from or f"pacsnode@{socket.gethostname()}"
        message["To"] = s.email_to
        message["Subject"] = f"[pacsnode {self.node_name}] {subject}"
        message.set_content(body)
        with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout) as smtp:
            if s.smtp_starttls:
                smtp.starttls()
            if s.smtp_user:
                smtp.login(s.smtp_user, s.smtp_password)
            smtp.send_message(message)
        log.info("notification %r sent to %s", subject, s.email_to)
