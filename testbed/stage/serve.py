"""The stage server process: `testbed stage serve` runs :func:`serve` until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys

from testbed.stage.server import StageConfig, StageServer
from testbed.stage.tasks import cancel_and_wait


async def serve(
    config: StageConfig, *, announce: bool = True, exit_with_parent: bool = False
) -> None:
    """Run a stage server until SIGTERM/SIGINT (the `testbed stage serve` command).

    Once listening it prints one JSON line on stdout: {"event": "listening", "url", "port",
    "pid", ...}; launchers read it to learn the bound port (use port 0 for a free one).
    `exit_with_parent`: also stop when the process that started this one dies.
    """
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    server = StageServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    async def watch_parent() -> None:
        while os.getppid() == parent:  # noqa: ASYNC110 - nothing to wait on but polling
            await asyncio.sleep(0.5)
        stop.set()

    watcher = asyncio.create_task(watch_parent()) if exit_with_parent else None
    try:
        await server.start()
        if announce:
            ex = server.executor
            line = {
                "event": "listening",
                "url": server.url,
                "host": config.host,
                "port": server.port,
                "tensor_port": server.tensor_port,
                "pid": os.getpid(),
                "name": config.label,
                "blocks": [ex.start, ex.end],
                "device": str(ex.device),
            }
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
        await stop.wait()
    finally:
        if watcher is not None:
            await cancel_and_wait(watcher)
        await server.aclose()
