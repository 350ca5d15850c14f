"""Stage servers as local processes: generation, concurrency, a dying stage, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from testbed.errors import StageError
from testbed.runtime.local import LocalStages, block_ranges, even_cuts
from testbed.stage.client import StageUnreachableError, generate_through
from testbed.stage.pipeline import PipelineClient
from tests.factories import reference_generate

pytestmark = [pytest.mark.model, pytest.mark.slow]

CLI = "from testbed.cli.main import main; main()"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_block_ranges_and_even_cuts():
    assert block_ranges(4, [2, 3]) == [(0, 2), (2, 3), (3, 4)]
    assert block_ranges(4, []) == [(0, 4)]
    assert even_cuts(4, 3) == [1, 3] and even_cuts(2, 3) == [1] and even_cuts(9, 3) == [3, 6]
    for bad in ([0], [2, 2], [3, 1], [4]):
        with pytest.raises(ValueError, match="non-empty ranges"):
            block_ranges(4, bad)


async def test_local_processes_generate_concurrently_and_a_dead_stage_fails_clearly(tiny_model):
    path = tiny_model("phi3")
    prompts = [[5, 17, 99, 200, 31, 7], [9, 8, 7], [300, 2, 1, 4, 4]]
    wants = [reference_generate(path, p, 8) for p in prompts]
    async with LocalStages(path, [1], threads=1) as stages:
        pids = [s.pid for s in stages.stages]
        assert len(stages.urls) == 2 and all(alive(p) for p in pids)
        got = await generate_through(stages.urls, prompts[0], 8)
        assert got == wants[0]
        async with PipelineClient(stages.urls) as pipe:
            results = await asyncio.gather(*(pipe.generate(p, 8) for p in prompts))
            assert [r.token_ids for r in results] == wants
            info = await pipe.client(stages.urls[1]).info()
            assert info["blocks"] == [1, 4] and info["requests"] == 0  # all released
            # a stage dies in the middle of a request: a clear error naming it
            step = await pipe.prefill("doomed", prompts[0])
            await stages.kill_stage(1)
            with pytest.raises(StageUnreachableError, match="unreachable") as err:
                await pipe.decode("doomed", step.token_id, len(prompts[0]))
            assert stages.urls[1] in str(err.value)
            assert isinstance(err.value, StageError)
    assert not any(alive(p) for p in pids)


async def test_a_stage_that_cannot_start_is_reported_and_nothing_is_left(tiny_model, tmp_path):
    path = tiny_model("phi3")
    stages = LocalStages(path, [2], serve_args=["--dtype", "float7"], startup_timeout_s=60)
    # the flag is refused before torch is imported: a quick failure
    with pytest.raises(Exception, match="float7") as err:
        await stages.start()
    assert "exited with code" in str(err.value)
    assert not any(alive(s.pid) for s in stages.stages)


def test_generate_cli_prints_tokens_and_stops_its_processes(tiny_model):
    from transformers import AutoTokenizer

    path = tiny_model("llama")
    res = subprocess.run(
        [sys.executable, "-c", CLI, "generate", str(path), "--split", "", "--prompt",
         "Once upon a time", "--max-new-tokens", "6", "--threads", "1", "--json"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    prompt_ids = AutoTokenizer.from_pretrained(path)("Once upon a time")["input_ids"]
    assert out["token_ids"] == reference_generate(path, prompt_ids, 6)
    assert [s["blocks"] for s in out["stages"]] == [[0, 4]]
    assert set(out["timings"]) >= {"ttft_s", "e2e_s", "per_stage"}
    assert not any(alive(s["pid"]) for s in out["stages"])


def test_generate_cli_rejects_a_bad_split_before_starting_anything(tiny_model):
    path = tiny_model("phi3")
    res = subprocess.run(
        [sys.executable, "-c", CLI, "generate", str(path), "--split", "3,1", "--prompt", "x"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 2
    assert "error:" in res.stderr and "strictly increasing" in res.stderr
    assert "Traceback" not in res.stderr
