"""Device profiles and a small built-in catalog.

Numbers are approximate vendor peak figures for dense FP16/BF16 tensor math (CPU: FP32 SIMD)
and memory bandwidth; the cost model derates them by ``compute_efficiency`` and
``bandwidth_efficiency``. They are starting points, not measurements: override any field in a
topology file (``device: {base: rtx-3090, mem: 20GiB}``) or replace the estimate with a
measured profile (``testbed profile``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from testbed.errors import brief
from testbed.spec.quantities import Bytes, BytesPerS, FiniteFloat, Flops, Seconds, StrictInt

GiB = 2**30


class DeviceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: Literal["gpu", "cpu"]
    label: str = ""  # human name, e.g. "NVIDIA RTX 3090"
    peak_flops: Flops = Field(gt=0)  # FLOP/s of the whole device at the model's dtype
    mem_bandwidth: BytesPerS = Field(gt=0)  # bytes/s
    mem: Bytes = Field(gt=0)  # bytes usable for weights + KV cache
    cores: StrictInt | None = Field(default=None, gt=0, le=4096)  # CPU: cores peak_flops is for
    cpus: FiniteFloat | None = Field(
        default=None, ge=0.01, le=4096
    )  # container CPU quota (cores); CPU compute scales with it
    mem_limit: Bytes | None = Field(
        default=None, gt=0
    )  # container memory limit (default: mem + 1GiB)
    compute_efficiency: FiniteFloat = Field(default=0.5, ge=0.001, le=1)  # achieved / peak FLOP/s
    bandwidth_efficiency: FiniteFloat = Field(default=0.7, ge=0.001, le=1)  # achieved / peak B/s
    step_overhead: Seconds = Field(default=0.0, ge=0)  # fixed cost per block per step ("50us")

    @property
    def effective_flops(self) -> float:
        """FLOP/s the cost model assumes: peak x efficiency, scaled by the CPU quota for CPUs."""
        f = self.peak_flops * self.compute_efficiency
        if self.kind == "cpu" and self.cpus is not None and self.cores:
            f *= min(self.cpus, self.cores) / self.cores
        return f

    @property
    def effective_bandwidth(self) -> float:
        return self.mem_bandwidth * self.bandwidth_efficiency

    @property
    def container_mem_limit(self) -> int:
        return self.mem_limit if self.mem_limit is not None else self.mem + GiB


def _gpu(label: str, tflops: float, gbps: float, mem_gib: float, cpus: float = 8) -> dict[str, Any]:
    return {
        "kind": "gpu",
        "label": label,
        "peak_flops": tflops * 1e12,
        "mem_bandwidth": gbps * 1e9,
        "mem": int(mem_gib * GiB),
        "cpus": cpus,
    }


def _cpu(label: str, gflops: float, gbps: float, mem_gib: float, cores: int) -> dict[str, Any]:
    return {
        "kind": "cpu",
        "label": label,
        "peak_flops": gflops * 1e9,
        "mem_bandwidth": gbps * 1e9,
        "mem": int(mem_gib * GiB),
        "cores": cores,
        "cpus": float(cores),
    }


# name -> fields. FP16 dense tensor peaks; Jetson figures are the module's GPU, shared memory.
CATALOG: dict[str, dict[str, Any]] = {
    "jetson-orin-nano": _gpu("NVIDIA Jetson Orin Nano 8GB", 10, 68, 6, cpus=6),
    "jetson-agx-orin": _gpu("NVIDIA Jetson AGX Orin 64GB", 42, 204.8, 56, cpus=12),
    "rtx-3090": _gpu("NVIDIA GeForce RTX 3090", 71, 936, 24),
    "rtx-4090": _gpu("NVIDIA GeForce RTX 4090", 165, 1008, 24),
    "l4": _gpu("NVIDIA L4", 121, 300, 24),
    "a10": _gpu("NVIDIA A10", 125, 600, 24),
    "a100-40gb": _gpu("NVIDIA A100 40GB SXM", 312, 1555, 40, cpus=16),
    "a100-80gb": _gpu("NVIDIA A100 80GB SXM", 312, 2039, 80, cpus=16),
    "h100": _gpu("NVIDIA H100 80GB SXM", 989, 3350, 80, cpus=16),
    "raspberry-pi-5": _cpu("Raspberry Pi 5 (4x Cortex-A76)", 40, 17, 8, cores=4),
    "cpu-generic": _cpu("Generic 8-core x86 server CPU (AVX2)", 500, 50, 16, cores=8),
    "cpu-core": _cpu("One x86 core (AVX2), for CPU-only test topologies", 60, 10, 2, cores=1),
}


def catalog_names() -> list[str]:
    return sorted(CATALOG)


def _with_units(fields: dict[str, Any]) -> dict[str, Any]:
    """Catalog numbers written with their units, as a file must write them (lossless: repr)."""
    out = dict(fields)
    for key, unit in (("peak_flops", "FLOPS"), ("mem_bandwidth", "B/s"), ("mem", "B")):
        if isinstance(out.get(key), int | float):
            out[key] = f"{out[key]!r}{unit}"
    return out


def resolve_device(value: Any) -> Any:
    """Turn ``"rtx-3090"`` or ``{base: "rtx-3090", mem: "20GiB"}`` into full profile fields.

    Raises ValueError (pydantic turns it into a field error) naming the catalog entries.
    """
    if isinstance(value, DeviceProfile):
        return value
    if isinstance(value, dict) and "base" in value and not isinstance(value["base"], str):
        raise ValueError(
            f"base must be a catalog device name, got {brief(value['base'])}; "
            f"catalog: {', '.join(catalog_names())}"
        )
    if isinstance(value, str):
        if value not in CATALOG:
            import difflib

            close = difflib.get_close_matches(value, CATALOG, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"unknown device {value!r}; {hint}catalog: {', '.join(catalog_names())}, "
                "or write a full profile (kind, peak_flops, mem_bandwidth, mem)"
            )
        return _with_units(CATALOG[value])
    if isinstance(value, dict) and "base" in value:
        base = value["base"]
        merged = dict(resolve_device(base))
        merged.update({k: v for k, v in value.items() if k != "base"})
        cores = value.get("cores")
        if "cpus" not in value and merged.get("kind") == "cpu" and isinstance(cores, int):
            merged["cpus"] = float(cores)
        return merged
    return value


# The catalog must itself be valid; fail at import rather than in a user's run.
for _fields in CATALOG.values():
    DeviceProfile(**_fields)
