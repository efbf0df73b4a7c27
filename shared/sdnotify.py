"""systemd notify protocol (READY=1, WATCHDOG=1, STOPPING=1) without a dependency.

Does nothing unless ``NOTIFY_SOCKET`` is set. The watchdog ping must come from the event loop
(see :func:`watchdog_interval_s`), so that a hung loop trips systemd's WatchdogSec.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, socket_path: str | None = None) -> None:
        path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        self._addr: str | None = None
        if path:
            # Abstract namespace sockets are written with a leading '@'.
            self._addr = "\0" + path[1:] if path.startswith("@") else path

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, state: str) -> bool:
        if self._addr is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(self._addr)
                s.sendall(state.encode())
        except OSError as exc:
            log.warning("sd_notify(%s) failed: %s", state, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")


def watchdog_interval_s(default_s: float = 10.0) -> float:
    """Half of systemd's WATCHDOG_USEC when set, else ``default_s``."""
    usec = os.environ.get("WATCHDOG_USEC")
    if usec and usec.isdigit() and int(usec) > 0:
        return int(usec) / 2e6
    return default_s
