"""A stage server's configuration (:class:`StageConfig`); the CLI builds it from flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from testbed.errors import ConfigError
from testbed.stage.batcher import BatchLimits
from testbed.stage.limits import InputLimits
from testbed.stage.wire import WireLimits


@dataclass(frozen=True)
class StageConfig:
    """Everything a stage server needs; the CLI builds it from flags."""

    model_dir: str
    start: int  # first block (inclusive)
    end: int  # last block (exclusive)
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port (the bound one is printed and in .port)
    name: str | None = None  # label in /info and /metrics; default "stage-<start>-<end>"
    device: str | None = None  # None = cuda when present, else cpu
    dtype: str | None = None  # None/"auto" = checkpoint dtype on cuda, float32 on cpu
    threads: int | None = None  # torch intra-op threads; None = torch's default
    max_inflight: int = 1  # batches computed at once (worker threads)
    max_queue: int = 32  # steps allowed to wait for a batch beyond those running
    batch: BatchLimits = field(default_factory=BatchLimits)  # continuous batching limits
    max_requests: int = 256  # request caches held at once
    request_ttl_s: float = 600.0  # caches idle longer than this are dropped
    # when every cache slot is taken, a prefill evicts the least recently used cache idle
    # longer than this (a flood of abandoned prefills cannot lock the stage for the TTL)
    evict_idle_s: float = 5.0
    tensor_port: int | None = 0  # the TCP tensor port (0 = any free port, None = off)
    limits: WireLimits = field(default_factory=WireLimits)
    inputs: InputLimits = field(default_factory=InputLimits)  # memory budget, timeouts
    emulation: str | None = None  # emulated device: an EmulationSpec's JSON (testbed.emulation)
    warmup: bool = True  # throwaway steps after loading, before /health answers (model.warmup)

    def __post_init__(self) -> None:
        if self.max_inflight < 1:
            raise ConfigError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.emulation is not None and self.max_inflight != 1:  # a device runs one step
            raise ConfigError(
                f"an emulated stage runs one step at a time; max_inflight must be 1, "
                f"got {self.max_inflight}"
            )
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_requests < 1:
            raise ConfigError(
                f"{self.max_requests} must be >= 1 (request caches held at once)",
                field="max_requests",
            )
        if not 0 < self.request_ttl_s < float("inf"):
            raise ConfigError(f"request_ttl_s must be > 0, got {self.request_ttl_s}")
        if not 0 <= self.evict_idle_s < float("inf"):
            raise ConfigError(f"evict_idle_s must be >= 0 seconds, got {self.evict_idle_s}")

    @property
    def label(self) -> str:
        return self.name or f"stage-{self.start}-{self.end}"
