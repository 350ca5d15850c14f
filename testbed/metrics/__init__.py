"""Per-request records and run metrics (vLLM serving-benchmark definitions).

Pure except :mod:`testbed.metrics.report`, which writes the results files.
"""

from testbed.metrics.chrome_trace import chrome_trace
from testbed.metrics.compare import (
    DEFAULT_METRICS,
    CompareRow,
    MetricSpec,
    compare_rows,
    csv_table,
    markdown_table,
    rich_table,
    summary_table,
)
from testbed.metrics.records import RequestRecord, Span, totals_from_spans
from testbed.metrics.summary import (
    SLO,
    Dist,
    Summary,
    busy_from_spans,
    merged_busy_s,
    run_wall_s,
    summarize,
)

__all__ = [
    "DEFAULT_METRICS",
    "SLO",
    "CompareRow",
    "Dist",
    "MetricSpec",
    "RequestRecord",
    "Span",
    "Summary",
    "busy_from_spans",
    "chrome_trace",
    "compare_rows",
    "csv_table",
    "markdown_table",
    "merged_busy_s",
    "rich_table",
    "run_wall_s",
    "summarize",
    "summary_table",
    "totals_from_spans",
]
