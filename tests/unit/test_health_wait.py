"""The one health wait (`runtime/measure.wait_urls_healthy`) against real HTTP servers: a node
with alternative urls (a swarm task on this host: its bridge address, then its published port)
is kept at the first that answers, and a timeout names every url's last answer."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from testbed.errors import StageTimeoutError
from testbed.runtime.measure import wait_urls_healthy


async def _server(status: int, loading: int = 0) -> tuple[web.AppRunner, str]:
    """A /health answering ``status``, after ``loading`` answers of 503."""
    seen = [0]

    async def health(_: web.Request) -> web.Response:
        seen[0] += 1
        code = 503 if seen[0] <= loading else status
        return web.Response(status=code, text="ok" if code == 200 else "loading")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def _closed_url() -> str:
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, str]]:
    runners = []
    urls = {}
    for name, status in (("ok", 200), ("ok2", 200), ("loading", 503)):
        runner, url = await _server(status)
        runners.append(runner)
        urls[name] = url
    yield urls
    for r in runners:
        await r.cleanup()


async def test_the_first_way_that_answers_is_kept(servers: dict[str, str]) -> None:
    dead = _closed_url()
    got = await wait_urls_healthy(
        {
            "direct-dead": [dead, servers["ok"]],
            "both-live": [servers["ok2"], servers["ok"]],
            "plain": servers["ok"],
        },
        5.0,
        interval_s=0.05,
    )
    assert got == {
        "direct-dead": servers["ok"],
        "both-live": servers["ok2"],
        "plain": servers["ok"],
    }


async def test_a_timeout_names_each_ways_last_answer(servers: dict[str, str]) -> None:
    dead = _closed_url()
    with pytest.raises(StageTimeoutError) as exc:
        await wait_urls_healthy(
            {"fine": servers["ok"], "stuck": [dead, servers["loading"]]}, 0.3, interval_s=0.05
        )
    msg = str(exc.value)
    assert "fine" not in msg
    assert f"stuck ({dead}: ClientConnectorError; {servers['loading']}: HTTP 503)" in msg


async def test_a_node_that_is_gone_fails_at_once(servers: dict[str, str]) -> None:
    from testbed.errors import RuntimeBackendError

    with pytest.raises(RuntimeBackendError, match="stage server x exited"):
        await wait_urls_healthy(
            {"x": [_closed_url(), servers["loading"]]},
            60.0,
            gone=lambda name: "exited" if name == "x" else None,
        )


async def test_an_earlier_way_that_comes_up_meanwhile_is_preferred(servers: dict[str, str]) -> None:
    # the bridge address refused the poll's first try (the stage was not listening yet), the
    # published port answered right after: the bridge address is tried again and kept
    runner, late = await _server(200, loading=1)
    try:
        got = await wait_urls_healthy({"n": [late, servers["ok"]]}, 5.0, interval_s=0.05)
    finally:
        await runner.cleanup()
    assert got == {"n": late}
