"""Workloads: trace readers, synthetic arrivals, knobs, prompt synthesis, arrival pacing."""

from testbed.workload.arrivals import Arrival, arrivals, injection_lag_s, send_times
from testbed.workload.knobs import Knobs, apply_knobs
from testbed.workload.prompts import synthesize_prompt_ids
from testbed.workload.readers import read_azure, read_burstgpt, read_mooncake, read_trace
from testbed.workload.request import TraceRequest, TraceRow, Workload, WorkloadStats
from testbed.workload.spec import WorkloadSpec, load_workload, parse_workload_spec

__all__ = [
    "Arrival",
    "Knobs",
    "TraceRequest",
    "TraceRow",
    "Workload",
    "WorkloadSpec",
    "WorkloadStats",
    "apply_knobs",
    "arrivals",
    "injection_lag_s",
    "load_workload",
    "parse_workload_spec",
    "read_azure",
    "read_burstgpt",
    "read_mooncake",
    "read_trace",
    "send_times",
    "synthesize_prompt_ids",
]
