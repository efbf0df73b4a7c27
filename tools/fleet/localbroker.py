"""A private Mosquitto 2 on a free loopback port, for tests, ``moe2 demo`` and ``reproduce``.

Nothing in moe2 depends on a broker started by hand: whoever needs one starts this and stops it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_mosquitto() -> str:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if cand and Path(cand).is_file():
            return cand
    raise BrokerError(
        "mosquitto is not installed: install Eclipse Mosquitto 2 "
        "(Debian: apt-get install -y mosquitto)"
    )


class LocalBroker:
    """``with LocalBroker() as b: b.url`` -- a mosquitto on 127.0.0.1:<free port>.

    ``config_text`` replaces the generated config (it must contain ``{port}``); ``stop()`` and
    ``start()`` may be called again to simulate a broker restart on the same port.
    ``tcp_nodelay=False`` leaves out ``set_tcp_nodelay true``: Mosquitto's default, Nagle's
    algorithm on the broker's sockets (the "stock broker" of the benches and the stall check).
    """

    def __init__(self, port: int | None = None, config_text: str | None = None,
                 workdir: str | None = None, *, tcp_nodelay: bool = True) -> None:
        self.port = port or free_port()
        self._config_text = config_text
        self.tcp_nodelay = tcp_nodelay
        self._own_dir = workdir is None
        self._dir = Path(workdir or tempfile.mkdtemp(prefix="moe2-broker-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = self._dir / "mosquitto.log"

    @property
    def pid(self) -> int | None:
        """The running mosquitto's process id (benchmarks read its CPU time)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        conf = self._dir / "mosquitto.conf"
        if self._config_text is not None:
            text = self._config_text.format(port=self.port, dir=self._dir)
        else:
            text = (
                f"listener {self.port} 127.0.0.1\n"
                "allow_anonymous true\n"
                "persistence false\n"
                "max_queued_messages 100000\n"
                "max_inflight_messages 0\n"
                "message_size_limit 0\n"
                + ("set_tcp_nodelay true\n" if self.tcp_nodelay else "")
            )
        conf.write_text(text)
        return conf

    def start(self, timeout_s: float = 10.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        conf = self._write_config()
        logf = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(conf)], stdout=logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        logf.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with {self._proc.returncode}: {self.log_tail()}"
                )
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.2
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout_s}s")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
