"""foliod-load: a load driver for foliod (workloads, trace replay, live progress, reports).

    foliod-load rand-read --zipf-alpha 1.1 --concurrency 8 --duration 30 --report out/

The package's modules: workloads (what each worker sends, by name), traces (text, CSV, MSR and
oracleGeneral readers and their mapping onto files), histogram (log-bucketed latencies),
runner (open-loop schedule, workers, unary and batched submission), progress (the terminal
line), report (JSON, text and the HTML page), cli (the command line), mrc (``foliod-load mrc``,
miss-ratio curves over a grid of servers) and reference (textbook LRU, FIFO and CLOCK).
"""

from foliodclient.load.histogram import Histogram
from foliodclient.load.runner import RunConfig, RunResult, Schedule, run
from foliodclient.load.traces import Trace, TraceError, load_trace
from foliodclient.load.workloads import WORKLOADS, Params, Workload

__all__ = [
    "WORKLOADS",
    "Histogram",
    "Params",
    "RunConfig",
    "RunResult",
    "Schedule",
    "Trace",
    "TraceError",
    "Workload",
    "load_trace",
    "run",
]
