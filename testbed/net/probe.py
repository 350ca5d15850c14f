"""Measure a link as the stages see it: RTT and throughput over TCP through the hop hook.

A tiny TCP service runs next to each stage server (``python -m testbed.net.probe serve
--port 9101`` inside the container, or in-process for local runs). Protocol, one exchange
per message on a kept-open connection::

    client -> "<n>\\n" + n bytes          server -> "<n>\\n" once all n bytes are in
    client -> "get <n>\\n"                server -> "<n>\\n" + n bytes (the reverse direction)

The client calls the hop's ``before_send(nbytes)`` hook before each send, exactly as the
stage client does, so app-level delay (backend ``kernel-rate+app-delay``/``app``) is part of
what is measured; kernel shaping (htb/tbf/netem on the node's interfaces) is on the path
anyway because the probe talks to the node's own address.

RTT = median over a few 1-byte exchanges. Throughput = bytes x 8 / (time of one large
exchange - median RTT); the large message is sized to ~``seconds`` of the configured rate.
With ``reverse`` the large message comes back from the server instead (the link's return
direction, e.g. a stage's answers to the previous stage).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Protocol

from testbed.errors import RuntimeBackendError

DEFAULT_PORT = 9101
MAX_MESSAGE_BYTES = 256 * 2**20
_CHUNK = 256 * 1024


class HopHook(Protocol):
    async def before_send(self, nbytes: int) -> None: ...


@dataclass(frozen=True)
class LinkMeasurement:
    rtt_s: float  # median
    throughput_bps: float | None  # None when not measured
    samples: int


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            get = line.startswith(b"get ")
            try:
                n = int(line[4:] if get else line.strip())
            except ValueError:
                break
            if not 0 <= n <= MAX_MESSAGE_BYTES:
                break
            if get:  # send n bytes back
                writer.write(b"%d\n" % n)
                zeros = bytes(min(_CHUNK, n))
                for i in range(0, n, _CHUNK):
                    writer.write(zeros[: min(_CHUNK, n - i)])
                    await writer.drain()
                continue
            left = n
            while left:
                chunk = await reader.read(min(_CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
            writer.write(b"%d\n" % n)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


class ProbeServer:
    """In-process probe service (local runtime and tests)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(_handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes, hook: HopHook | None
) -> float:
    t0 = time.perf_counter()
    if hook is not None:
        await hook.before_send(len(payload))
    writer.write(b"%d\n" % len(payload))
    view = memoryview(payload)
    for i in range(0, len(payload), _CHUNK):
        writer.write(view[i : i + _CHUNK])
        await writer.drain()
    await writer.drain()
    line = await reader.readline()
    if int(line.strip() or -1) != len(payload):
        raise RuntimeBackendError(f"probe: bad reply {line!r}")
    return time.perf_counter() - t0


async def _fetch(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, nbytes: int, hook: HopHook | None
) -> float:
    """Ask for ``nbytes`` from the server and read them all: the seconds it took."""
    t0 = time.perf_counter()
    if hook is not None:
        await hook.before_send(8)
    writer.write(b"get %d\n" % nbytes)
    await writer.drain()
    line = await reader.readline()
    if int(line.strip() or -1) != nbytes:
        raise RuntimeBackendError(f"probe: bad reply {line!r}")
    await reader.readexactly(nbytes)
    return time.perf_counter() - t0


async def measure_link(
    host: str,
    port: int,
    *,
    hook: HopHook | None = None,
    expected_rate_bps: float | None = None,
    rtt_samples: int = 9,
    seconds: float = 0.5,
    timeout_s: float = 30.0,
    reverse: bool = False,
) -> LinkMeasurement:
    """RTT and (if ``expected_rate_bps`` is given) throughput towards ``host:port``, or back
    from it with ``reverse``."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                await _exchange(reader, writer, b"x" * 64 * 1024, None)  # warm the connection up
                rtts = [await _exchange(reader, writer, b"x", hook) for _ in range(rtt_samples)]
                rtt = statistics.median(rtts)
                thr = None
                if expected_rate_bps:
                    nbytes = int(
                        min(MAX_MESSAGE_BYTES, max(256 * 1024, expected_rate_bps / 8 * seconds))
                    )
                    if reverse:
                        elapsed = await _fetch(reader, writer, nbytes, hook)
                    else:
                        elapsed = await _exchange(reader, writer, b"\0" * nbytes, hook)
                    thr = nbytes * 8 / max(elapsed - rtt, 1e-6)
                return LinkMeasurement(rtt, thr, rtt_samples)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    except TimeoutError:
        raise RuntimeBackendError(
            f"probe: no answer from {host}:{port} within {timeout_s:g}s"
        ) from None
    except OSError as exc:
        raise RuntimeBackendError(f"probe: cannot reach {host}:{port}: {exc}") from exc


async def _serve(host: str, port: int) -> None:
    server = ProbeServer(host, port)
    await server.start()
    print(f"probe listening on {host}:{server.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.aclose()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m testbed.net.probe", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the probe service")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    m = sub.add_parser("measure", help="measure towards a probe service")
    m.add_argument("host")
    m.add_argument("--port", type=int, default=DEFAULT_PORT)
    m.add_argument("--rate-bps", type=float, default=None)
    m.add_argument("--seconds", type=float, default=0.5, help="length of the throughput probe")
    m.add_argument("--timeout", type=float, default=30.0)
    m.add_argument(
        "--hop",
        default=None,
        help="app-level shape of the hop as JSON {forward, reverse, apply_rate}: sent through "
        "an app shaper, as a forwarding stage sends (node-to-node link check)",
    )
    m.add_argument("--seed", type=int, default=0, help="seed of that shaper")
    m.add_argument(
        "--reverse",
        action="store_true",
        help="measure the throughput back from the service (the link's return direction)",
    )
    m.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args.host, args.port))
        return
    hook = None
    if args.hop is not None:
        from testbed.net.appshaper import AppShaper, HopShape
        from testbed.net.shaping import DirShape

        d = json.loads(args.hop)
        shape = HopShape(DirShape(**d["forward"]), DirShape(**d["reverse"]), d["apply_rate"])
        hook = AppShaper(shape, seed=args.seed, name=args.host)
    res = asyncio.run(
        measure_link(
            args.host,
            args.port,
            hook=hook,
            expected_rate_bps=args.rate_bps,
            seconds=args.seconds,
            timeout_s=args.timeout,
            reverse=args.reverse,
        )
    )
    print(json.dumps(asdict(res)) if args.json else res)


if __name__ == "__main__":
    main()
