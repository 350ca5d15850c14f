"""Two block ranges on one stage server (adaptive re-partitioning's overlap,
:mod:`testbed.stage.generations`): ``/load keep:true`` while requests hold caches, requests of
both plans side by side with tokens equal to the whole model's ``generate``, ``/unload``
refused while the old range holds a request and accepted once it is free."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from testbed.stage.client import StageClient
from testbed.stage.forward import StepOptions
from testbed.stage.server import StageConfig, StageServer
from tests.factories import reference_generate

pytestmark = pytest.mark.model

PROMPT = [5, 17, 99, 200, 31, 7, 250, 3, 44]
NEW = 6


async def post(url: str, route: str, body: object) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(url + route, json=body) as resp:
        return resp.status, await resp.json()


async def info(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url + "/info") as resp:
        return await resp.json()


class Request:
    """One request stepped by hand through ``clients``, each step naming ``blocks``."""

    def __init__(self, rid: str, clients: list[StageClient], blocks: list[tuple[int, int]] | None):
        self.rid, self.clients, self.blocks = rid, clients, blocks
        self.tokens: list[int] = []

    async def step(self) -> None:
        first = not self.tokens
        data: object = PROMPT if first else [self.tokens[-1]]
        pos = 0 if first else len(PROMPT) + len(self.tokens) - 1
        for j, c in enumerate(self.clients):
            opts = StepOptions(blocks=self.blocks[j]) if self.blocks else StepOptions()
            r = await c.forward(self.rid, "prefill" if first else "decode", pos, data,  # type: ignore[arg-type]
                                options=opts)  # fmt: skip
            data = r.hidden if r.hidden is not None else r.token_id
        assert isinstance(data, int)
        self.tokens.append(data)


@pytest.fixture
def model(tiny_model):
    return tiny_model("phi3", layers=4, heads=4, kv_heads=2)


async def test_two_generations_serve_old_and_new_requests_exactly(model):
    want = reference_generate(model, PROMPT, NEW)[len(PROMPT) :]
    servers = [StageServer(StageConfig(str(model), a, b, name=f"s{i}"))
               for i, (a, b) in enumerate([(0, 2), (2, 4)])]  # fmt: skip
    for s in servers:
        await s.start()
    clients = [StageClient(s.url) for s in servers]
    try:
        for c in clients:
            await c.start()
        urls = [s.url for s in servers]
        old = Request("old", clients, None)  # started before the migration, no blocks named
        for _ in range(2):
            await old.step()
        w0 = [(await info(u))["param_bytes"] for u in urls]
        # load the new ranges beside the old ones while "old" holds caches on both stages
        for url, (a, b) in zip(urls, [(0, 3), (3, 4)], strict=True):
            status, body = await post(url, "/load", {"start": a, "end": b, "keep": True})
            assert status == 200 and body["loaded"] and body["generation"] == 1, body
            assert [g["blocks"] for g in body["generations"]] == [
                list({0: (0, 2), 1: (2, 4)}[urls.index(url)]),
                [a, b],
            ]
        got = [await info(u) for u in urls]
        assert got[0]["blocks"] == [0, 3] and got[1]["blocks"] == [3, 4]
        assert got[0]["param_bytes"] > w0[0]  # both ranges' weights during the overlap
        new = Request("new", clients, [(0, 3), (3, 4)])
        late = Request("late", clients, [(0, 2), (2, 4)])  # an old-plan request's first step
        stray = Request("stray", clients, [(0, 1), (1, 4)])
        with pytest.raises(Exception, match="holds 0:2, 0:3"):
            await stray.step()
        while len(new.tokens) < NEW or len(old.tokens) < NEW or len(late.tokens) < NEW:
            await asyncio.gather(*(r.step() for r in (old, new, late) if len(r.tokens) < NEW))
        assert old.tokens == want and new.tokens == want and late.tokens == want
        # the old range holds "old" and "late": unloading it now would break them
        status, err = await post(urls[0], "/unload", {"start": 0, "end": 2})
        assert status == 409 and err["code"] == "in_use" and "2 request(s)" in err["error"], err
        status, err = await post(urls[0], "/unload", {"start": 0, "end": 3})
        assert status == 400 and "no older generation" in err["error"], err
        for c in clients:
            for rid in ("old", "late", "new"):
                await c.release(rid)
        for url, (a, b) in zip(urls, [(0, 2), (2, 4)], strict=True):
            status, body = await post(url, "/unload", {"start": a, "end": b})
            assert status == 200 and body["unloaded"] == [a, b] and body["freed_bytes"] > 0, body
            assert body["generations"] is None  # one range again, served alone
        again = Request("again", clients, None)
        for _ in range(NEW):
            await again.step()
        assert again.tokens == want
        assert (await info(urls[0]))["param_bytes"] < got[0]["param_bytes"]
    finally:
        for c in clients:
            await c.aclose()
        for s in servers:
            await s.aclose()
