"""Which GPUs a GPU node gets (pure: builds requests, calls nothing).

A topology node may name its GPUs: ``gpus: [0, 2]`` (indices on its host) or ``gpus: 2``
(a count); without ``gpus`` a GPU node gets every GPU of its host on one engine (as before)
and one GPU on Swarm. A CPU node never gets a GPU.

- **One host** (``docker``): a Docker device request, ``device_ids`` for indices or ``count``
  for a count (``--gpus '"device=0,2"'`` / ``--gpus 2``).
- **Swarm**: a generic-resource reservation of ``count`` units of ``NVIDIA-GPU`` (what a
  worker advertises with ``node-generic-resources`` in its daemon.json), so the scheduler
  places the task only where that many are free and hands it their ids in
  ``DOCKER_RESOURCE_NVIDIA-GPU``. Swarm cannot reserve *named* units; indices therefore also
  set ``NVIDIA_VISIBLE_DEVICES`` to them (the NVIDIA runtime honours it) and reserve as many
  units as indices, so the scheduler's bookkeeping stays right.
"""

from __future__ import annotations

from dataclasses import dataclass

SWARM_GPU_RESOURCE = "NVIDIA-GPU"


@dataclass(frozen=True)
class GpuAsk:
    """What one node asks for: ``ids`` (indices) or ``count``; all None = every GPU."""

    ids: tuple[int, ...] | None = None
    count: int | None = None

    @property
    def units(self) -> int | None:
        """GPUs reserved (None: all of the host's)."""
        return len(self.ids) if self.ids is not None else self.count


def gpu_ask(gpus: tuple[int, ...] | int | None) -> GpuAsk:
    """The topology's ``gpus`` value as a request."""
    if gpus is None:
        return GpuAsk()
    if isinstance(gpus, int):
        return GpuAsk(count=gpus)
    return GpuAsk(ids=tuple(gpus))


def docker_device_request(ask: GpuAsk) -> dict[str, object]:
    """Keyword arguments of ``docker.types.DeviceRequest`` for one engine."""
    if ask.ids is not None:
        return {"device_ids": [str(i) for i in ask.ids], "capabilities": [["gpu"]]}
    return {"count": ask.count if ask.count is not None else -1, "capabilities": [["gpu"]]}


@dataclass(frozen=True)
class SwarmGpuRequest:
    generic_resources: dict[str, int]  # Resources(generic_resources=...) reservation
    env: dict[str, str]  # added to the task's environment


def swarm_gpu_request(ask: GpuAsk) -> SwarmGpuRequest:
    units = ask.units if ask.units is not None else 1
    env = {"NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}
    if ask.ids is not None:
        env["NVIDIA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ask.ids)
    return SwarmGpuRequest({SWARM_GPU_RESOURCE: units}, env)
