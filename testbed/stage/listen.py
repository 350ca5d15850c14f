"""Binding a stage's ports: a failed bind is a one-line configuration error, not a traceback."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator

from testbed.errors import ConfigError


@contextlib.contextmanager
def bind_errors(host: str, port: int, flag: str) -> Iterator[None]:
    """A failed bind as a one-line :class:`ConfigError` naming the flag and the fix."""
    try:
        yield
    except socket.gaierror as exc:
        raise ConfigError(
            f"{host!r} is not an address of this host ({exc.strerror}); "
            "give an IP address or a resolvable name, e.g. --host 127.0.0.1",
            field="--host",
        ) from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use; pick another or 0 (any free port)",
                field=flag,
            ) from None
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
            "give an address of this host, e.g. --host 127.0.0.1",
            field="--host",
        ) from None


def check_bindable(host: str, port: int, flag: str) -> None:
    """Fail fast, before the slow model load: bind ``host:port`` once (as the server will, with
    SO_REUSEADDR) and let it go. The real bind can still lose a race for the port; it reports
    the same way."""
    with bind_errors(host, port, flag):
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
