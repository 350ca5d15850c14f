"""Adaptive re-partitioning: how often a run re-solves its split, and when it migrates (pure data).

repartition:
  every: 10s            # check this often (from the run's start)
  threshold: 10%        # migrate when the predicted bottleneck improves by at least this much
  allow_empty: true     # a re-plan may leave a tier without blocks (to route around a bad link)
  load_bandwidth: 1GB/s # how fast a node loads the weights of blocks it did not hold
  confirm: 1            # migrate once this many checks in a row propose the same new split

Each check re-solves the split (BSDP) from the measured state (links as they are now, node
speeds from the scheduler's capacity estimates; :mod:`testbed.cost.replan`); a migration loads
the new blocks beside the old ones, new requests take the new plan once they are loaded, and
requests in flight finish on the old one (the simulator: :mod:`testbed.sim.migrate`; a replay:
:mod:`testbed.experiment.adaptive`). In `compare`, a pair written ``P+S+adaptive`` runs with it
(``P+S`` stays static); `testbed simulate` and `testbed replay` run the scenario as written.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from testbed.spec.quantities import BytesPerS, LongSeconds, Percent, StrictBool

ADAPTIVE = "adaptive"  # the pair suffix that turns re-partitioning on in `compare`


class RepartitionSpec(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    every_s: LongSeconds = Field(alias="every")
    threshold_pct: Percent = Field(alias="threshold", gt=0)
    allow_empty: StrictBool = True
    # weights read from local storage into the device: bytes/s (1 GB/s, a plain NVMe read)
    load_bandwidth_Bps: BytesPerS = Field(default=1e9, alias="load_bandwidth")
    # damping: a split proposed by noisy measurements once is not worth a migration; the
    # same one proposed by `confirm` checks in a row is (1: migrate on the first)
    confirm: int = Field(default=1, ge=1, le=100, strict=True)

    @property
    def threshold(self) -> float:
        """The threshold as a fraction (10% -> 0.1)."""
        return self.threshold_pct / 100.0


def split_pair(pair: str) -> tuple[str, bool]:
    """``"bsdp+arts+adaptive"`` -> ("bsdp+arts", True); ``"bsdp+arts"`` -> ("bsdp+arts", False)."""
    head, _, tail = pair.rpartition("+")
    if head.count("+") == 1 and tail.strip() == ADAPTIVE:
        return head.strip(), True
    return pair, False
