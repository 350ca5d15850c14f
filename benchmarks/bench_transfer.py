"""Hidden-state transfer throughput: the stage wire path vs a raw loopback TCP copy.

Run: ``.venv/bin/python benchmarks/bench_transfer.py [--sizes-mib 1,4,16] [--repeats 20]``

Side by side in one run, for each message size:

1. **stage path**: a float32 hidden-state tensor is encoded (:mod:`testbed.stage.wire`), sent
   by :class:`testbed.stage.client.StageClient` to a stage server *process* on loopback, and
   fully decoded there into a tensor (op ``sink``: the same reading and validation as a
   forward, without compute); the clock stops when the acknowledgement is back. Measured over
   the stage's tensor port (what the client uses by default) and over HTTP ``POST /sink``.
2. **raw TCP**: the same number of bytes, already serialised, sent with ``sendall`` to a plain
   socket server process that ``recv_into``s a preallocated buffer and answers one byte.

Prints MiB/s for both and their ratio (target >= 0.7). The stage path's clock includes
serialisation, HTTP framing and decoding; the raw path's does not (a conservative ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

RAW_SERVER = textwrap.dedent(
    """
    import socket, struct, sys
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0)); srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    while True:
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            break
        (n,) = struct.unpack("<Q", head)
        if len(buf) < n:
            buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = conn.recv_into(view[got:n])
            if not k:
                sys.exit(1)
            got += k
        conn.sendall(b"k")
    """
)


def raw_tcp_seconds(payload: bytes, repeats: int) -> list[float]:
    import struct

    proc = subprocess.Popen([sys.executable, "-c", RAW_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = struct.pack("<Q", len(payload))
        times = []
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            sock.sendall(head)
            sock.sendall(payload)
            if sock.recv(1) != b"k":
                raise RuntimeError("raw server did not acknowledge")
            if i >= 2:  # two warm-up rounds
                times.append(time.perf_counter() - t0)
        sock.close()
        return times
    finally:
        proc.terminate()
        proc.wait(10)


async def stage_seconds(
    url: str, tensor: torch.Tensor, repeats: int, transport: str
) -> list[float]:
    from testbed.stage.client import StageClient

    times = []
    async with StageClient(url, timeout_s=60, transport=transport) as client:
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            await client.sink({"hidden": tensor})
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return times


async def main_async(args: argparse.Namespace) -> None:
    from testbed.model.tiny import make_tiny_model
    from testbed.runtime.local import LocalStages

    hidden = 1024
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        model = make_tiny_model(Path(tmp) / "m", "phi3")  # the sink needs no real weights
        async with LocalStages(model, [], threads=1) as stages:
            url = stages.urls[0]
            print(
                f"{'MiB':>6} {'tokens':>7} {'tensor port':>12} {'HTTP':>8} {'raw TCP':>8}"
                f" {'port/raw':>9} {'HTTP/raw':>9}   (MiB/s)"
            )
            ratios, http_ratios = [], []
            for mib in args.sizes_mib:
                tokens = max(1, int(mib * (1 << 20) / (hidden * 4)))
                tensor = torch.randn(1, tokens, hidden)
                nbytes = tensor.numel() * 4
                from testbed.stage.wire import encode

                raw_payload = encode({"request_id": "bench"}, {"hidden": tensor})
                st, ht, rt = [], [], []
                for _ in range(args.rounds):  # alternate to share any background noise
                    st += await stage_seconds(url, tensor, args.repeats, "tcp")
                    ht += await stage_seconds(url, tensor, args.repeats, "http")
                    rt += await asyncio.to_thread(raw_tcp_seconds, raw_payload, args.repeats)
                port_bps = nbytes / statistics.median(st)
                http_bps = nbytes / statistics.median(ht)
                raw_bps = len(raw_payload) / statistics.median(rt)
                ratios.append(port_bps / raw_bps)
                http_ratios.append(http_bps / raw_bps)
                mib = 1 << 20
                print(
                    f"{nbytes / mib:6.2f} {tokens:7d} {port_bps / mib:12.0f} {http_bps / mib:8.0f}"
                    f" {raw_bps / mib:8.0f} {ratios[-1]:9.2f} {http_ratios[-1]:9.2f}"
                )
            big = [r for r, m in zip(ratios, args.sizes_mib, strict=True) if m >= 1]
            print(
                f"stage tensor port / raw TCP, messages >= 1 MiB: median "
                f"{statistics.median(big or ratios):.2f} (target >= 0.7); HTTP /forward path: "
                f"{statistics.median(http_ratios):.2f}; medians of {args.repeats} x {args.rounds}"
                " sends per size, interleaved"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mib", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.25, 1.0, 4.0, 16.0])  # fmt: skip
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
