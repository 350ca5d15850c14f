"""Stage servers as local subprocesses on loopback, owned by an async context manager.

``async with LocalStages(model_dir, cuts=[2, 3]) as stages: stages.urls`` starts one
``testbed stage serve`` process per block range (port 0: each binds a free port and
announces it on stdout), waits until every one answers ``/health``, and on exit - normal,
error or Ctrl-C - stops them all: SIGTERM, then SIGKILL after a grace period. Stage processes
also exit by themselves when the process that started them dies (``--exit-with-parent``).
Used by ``testbed generate``, the tests and the benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import ConfigError, RuntimeBackendError, StageTimeoutError
from testbed.runtime.base import cli_launcher, stage_serve_argv


def block_ranges(num_blocks: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """Interior cut points -> block ranges: cuts [2, 3] of 4 blocks -> [(0,2), (2,3), (3,4)]."""
    cuts = list(cuts)
    bounds = [0, *cuts, num_blocks]
    for a, b in itertools.pairwise(bounds):
        if not a < b:
            raise ConfigError(
                f"cut points {cuts} do not split {num_blocks} blocks into non-empty ranges: "
                f"give strictly increasing cuts between 1 and {num_blocks - 1}",
                field="--split",
            )
    return list(itertools.pairwise(bounds))


def even_cuts(num_blocks: int, stages: int = 3) -> list[int]:
    """Cuts for `stages` near-equal ranges (fewer stages when there are fewer blocks)."""
    stages = max(1, min(stages, num_blocks))
    return [round(num_blocks * k / stages) for k in range(1, stages)]


@dataclass
class LocalStage:
    """One started stage process."""

    index: int
    start: int
    end: int
    proc: asyncio.subprocess.Process
    log_path: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, nbytes: int = 3000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-nbytes:].decode(errors="replace")


class LocalStages:
    """Start stage servers for `model_dir` split at `cuts` (interior cut points).

    `cuts=None` runs the whole model in one stage. Extra flags for every server go in
    `serve_args` (e.g. ``["--max-queue", "4"]``).
    """

    def __init__(
        self,
        model_dir: str | Path,
        cuts: Sequence[int] | None = None,
        *,
        host: str = "127.0.0.1",
        device: str | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        serve_args: Sequence[str] = (),
        startup_timeout_s: float = 120.0,
        stop_timeout_s: float = 5.0,
        log_dir: str | Path | None = None,
    ):
        from testbed.model.info import read_model_info

        self.model_dir = Path(model_dir)
        self.info = read_model_info(self.model_dir)
        self.ranges = block_ranges(self.info.num_blocks, cuts or [])
        self.host = host
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self.serve_args = list(serve_args)
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._log_dir = Path(log_dir) if log_dir else None
        self._own_log_dir = log_dir is None
        self.stages: list[LocalStage] = []

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.stages]

    async def __aenter__(self) -> LocalStages:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _argv(self, i: int, start: int, end: int) -> list[str]:
        extra = ["--exit-with-parent"]
        if self.device:
            extra += ["--device", self.device]
        if self.dtype:
            extra += ["--dtype", self.dtype]
        if self.threads:
            extra += ["--threads", str(self.threads)]
        return stage_serve_argv(
            cli_launcher(sys.executable),
            str(self.model_dir),
            (start, end),
            host=self.host,
            port=0,
            name=f"stage{i}",
            extra=[*extra, *self.serve_args],
        )

    async def start(self) -> None:
        if self.stages:
            raise RuntimeError("LocalStages already started")
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="testbed-stages-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i, (a, b) in enumerate(self.ranges):
                log_path = self._log_dir / f"stage{i}.log"
                log = await asyncio.to_thread(open, log_path, "wb")
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *self._argv(i, a, b),
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        env=os.environ | {"PYTHONUNBUFFERED": "1"},
                    )
                finally:
                    log.close()
                self.stages.append(LocalStage(i, a, b, proc, log_path))
            deadline = time.monotonic() + self.startup_timeout_s
            await asyncio.gather(*(self._wait_ready(s, deadline) for s in self.stages))
        except BaseException:
            await asyncio.shield(self.aclose())
            raise

    async def _wait_ready(self, stage: LocalStage, deadline: float) -> None:
        name = f"stage{stage.index} (blocks {stage.start}:{stage.end}, pid {stage.pid})"
        while not stage.url:
            if stage.proc.returncode is not None:
                raise RuntimeBackendError(
                    f"{name} exited with code {stage.proc.returncode} while starting; "
                    f"its log:\n{stage.log_tail()}"
                )
            for line in stage.log_tail(1 << 16).splitlines():
                if line.startswith('{"event": "listening"'):
                    with contextlib.suppress(json.JSONDecodeError):
                        stage.url = json.loads(line)["url"]
            if stage.url:
                break
            if time.monotonic() > deadline:
                raise StageTimeoutError(
                    f"{name} did not start listening within {self.startup_timeout_s:g}s; "
                    f"its log:\n{stage.log_tail()}"
                )
            await asyncio.sleep(0.05)
        from testbed.runtime.measure import wait_urls_healthy

        def gone(_: str) -> str | None:
            code = stage.proc.returncode
            return None if code is None else f"exited with code {code}"

        try:
            await wait_urls_healthy(
                {name: stage.url}, max(0.0, deadline - time.monotonic()), gone=gone, interval_s=0.05
            )
        except (RuntimeBackendError, StageTimeoutError) as exc:
            raise type(exc)(f"{exc}; its log:\n{stage.log_tail()}") from None

    async def kill_stage(self, index: int) -> None:
        """SIGKILL one stage (tests: a stage that dies mid-request)."""
        stage = self.stages[index]
        if stage.proc.returncode is None:
            stage.proc.kill()
            await stage.proc.wait()

    async def aclose(self) -> None:
        """Stop every stage: SIGTERM, wait `stop_timeout_s`, then SIGKILL. Safe to repeat."""
        try:
            for s in self.stages:
                if s.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        s.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            for s in self.stages:
                left = max(0.0, deadline - time.monotonic())
                try:
                    await asyncio.wait_for(s.proc.wait(), timeout=left)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        s.proc.kill()
                    await s.proc.wait()
        finally:
            for s in self.stages:  # interrupted above: never leave a process behind
                if s.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        s.proc.kill()
            if self._own_log_dir and self._log_dir is not None:
                shutil.rmtree(self._log_dir, ignore_errors=True)
                self._log_dir = None
