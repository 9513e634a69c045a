"""The final report of a run: a JSON-ready dict, the text summary, and the HTML page.

The HTML page (``--report DIR``: DIR/index.html and DIR/report.json) is one self-contained file:
the summary tables and three plots over the run (throughput, latency, memmap bytes per model),
drawn by matplotlib as inline SVG, so it opens offline with no script or CDN. matplotlib is
imported only here, only when a page is written.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

from foliodclient._format import iec, table
from foliodclient._types import MemmapReport
from foliodclient.load.runner import NS_PER_SECOND, RunResult

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


def _memmap(report: MemmapReport) -> dict[str, Any]:
    return {
        str(m.model): {
            "total_bytes": m.total_bytes,
            "fraction_of_ram": m.fraction_of_ram,
            "hvo_freed_bytes": m.hvo_freed_bytes,
        }
        for m in report.models
    }


def build(result: RunResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the run measured, as plain JSON types; seconds and bytes in the key names."""
    rec, config = result.recorder, result.config
    elapsed = result.elapsed_seconds
    hist = rec.histogram
    latency: dict[str, float] = {
        name: hist.percentile(p) / NS_PER_SECOND for name, p in PERCENTILES
    }
    latency["max"] = hist.max / NS_PER_SECOND
    latency["min"] = hist.min / NS_PER_SECOND
    latency["mean"] = hist.mean / NS_PER_SECOND
    read_pages = rec.read_pages_hit + rec.read_pages_missed
    all_pages = rec.pages_hit + rec.pages_missed
    moved = rec.bytes_read + rec.bytes_written
    return {
        "workload": result.workload,
        "config": {
            "target": config.target,
            "machine": config.machine,
            "engine": config.engine,
            "mode": config.mode,
            "concurrency": config.concurrency,
            "batch_size": config.batch_size if config.mode == "batched" else 1,
            "rate": config.rate,
            "ops": config.ops,
            "duration_seconds": config.duration_seconds,
            "warmup_seconds": config.warmup_seconds,
            "device": config.device,
            **(extra or {}),
        },
        "interrupted": result.interrupted,
        "failures": [
            {"stage": stage, "code": exc.code.name, "message": exc.message}
            for stage, exc in result.failures
        ],
        "ops": rec.ops,
        "warmup_ops": rec.warmup_ops,
        "ops_by_kind": dict(sorted(rec.ops_by_kind.items())),
        "errors": rec.errors,
        "errors_by_code": dict(sorted(rec.errors_by_code.items())),
        "elapsed_seconds": elapsed,
        "throughput_ops_per_second": rec.ops / elapsed if elapsed else 0.0,
        "throughput_bytes_per_second": moved / elapsed if elapsed else 0.0,
        "accesses": rec.accesses,
        "accesses_per_second": rec.accesses / elapsed if elapsed else 0.0,
        "latency_seconds": latency,
        "histogram_buckets": sum(1 for _ in hist.buckets()),
        "bytes_read": rec.bytes_read,
        "bytes_written": rec.bytes_written,
        "cache": {
            "pages_hit": rec.pages_hit,
            "pages_missed": rec.pages_missed,
            "pages_readahead": rec.pages_readahead,
            "hit_ratio": rec.pages_hit / all_pages if all_pages else None,
            "read_hit_ratio": rec.read_pages_hit / read_pages if read_pages else None,
            "device_seconds": rec.device_seconds,
            "read_device_seconds": rec.read_device_seconds,
            "read_device_seconds_all_miss": rec.all_miss_device_seconds,
            "device_seconds_saved": rec.all_miss_device_seconds - rec.read_device_seconds,
        },
        "memmap": {"before": _memmap(result.memmap_before), "after": _memmap(result.memmap_after)},
        "buddyinfo": {
            "zone": result.buddy_after.zone,
            "before": list(result.buddy_before.free_blocks),
            "after": list(result.buddy_after.free_blocks),
        },
        "timeline": [
            {
                "t_seconds": s.t_seconds,
                "warmup": s.warmup,
                "ops": s.ops,
                "errors": s.errors,
                "ops_per_second": s.ops_per_second,
                "bytes_per_second": s.bytes_per_second,
                "p50_seconds": s.p50_seconds,
                "p99_seconds": s.p99_seconds,
                "max_seconds": s.max_seconds,
                "memmap_bytes": s.memmap_bytes,
            }
            for s in result.samples
        ],
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _signed_iec(nr_bytes: int) -> str:
    return ("+" if nr_bytes > 0 else "-" if nr_bytes < 0 else "") + iec(abs(nr_bytes))


def memmap_rows(data: dict[str, Any]) -> list[list[str]]:
    before, after = data["memmap"]["before"], data["memmap"]["after"]
    return [
        [
            model,
            iec(before[model]["total_bytes"]),
            iec(after[model]["total_bytes"]),
            _signed_iec(after[model]["total_bytes"] - before[model]["total_bytes"]),
            f"{after[model]['fraction_of_ram']:.4%}",
        ]
        for model in after
    ]


def text(data: dict[str, Any]) -> str:
    """The summary for people."""
    c, cfg, lat = data["cache"], data["config"], data["latency_seconds"]
    rate = "closed loop" if cfg["rate"] is None else f"open loop at {cfg['rate']:,g} ops/s"
    errors = ", ".join(f"{k} {v}" for k, v in data["errors_by_code"].items()) or "none"
    how = (
        "the trace in order through Replay RPCs (latency per call)"
        if cfg["mode"] == "rpc"
        else f"{cfg['concurrency']} workers ({cfg['engine']}), {cfg['mode']}, {rate}"
    )
    lines = [
        f"foliod-load {data['workload']}: {how}"
        + (" (interrupted)" if data["interrupted"] else ""),
        f"operations   {data['ops']:,} in {data['elapsed_seconds']:.2f} s "
        f"(+{data['warmup_ops']:,} warm-up), "
        + ", ".join(f"{k} {v:,}" for k, v in data["ops_by_kind"].items()),
        f"throughput   {data['throughput_ops_per_second']:,.1f} ops/s, "
        f"{iec(int(data['throughput_bytes_per_second']))}/s"
        + (
            f", {data['accesses_per_second']:,.0f} page accesses/s ({data['accesses']:,})"
            if data["accesses"]
            else ""
        ),
        "latency      "
        + "  ".join(f"{name} {_ms(lat[name])}" for name, _ in PERCENTILES)
        + f"  max {_ms(lat['max'])}  (mean {_ms(lat['mean'])})",
        f"bytes        read {iec(data['bytes_read'])}, written {iec(data['bytes_written'])}",
        f"page cache   {c['pages_hit']:,} pages hit, {c['pages_missed']:,} missed, "
        f"{c['pages_readahead']:,} read ahead: hit ratio {_ratio(c['hit_ratio'])} "
        f"(reads {_ratio(c['read_hit_ratio'])})",
        f"device time  {_ms(c['device_seconds'])} simulated ({cfg['device']}); reads "
        f"{_ms(c['read_device_seconds'])} against {_ms(c['read_device_seconds_all_miss'])} "
        f"if all missed: {_ms(c['device_seconds_saved'])} saved by the cache",
        f"errors       {data['errors']:,}: {errors}",
        *(f"FAILED       {f['stage']}: {f['code']}: {f['message']}" for f in data["failures"]),
        "",
        "memory map (before setup, after the run)",
        table(["model", "before", "after", "change", "of RAM"], memmap_rows(data)).rstrip(),
        "",
        f"buddyinfo    before {' '.join(map(str, data['buddyinfo']['before']))}",
        f"             after  {' '.join(map(str, data['buddyinfo']['after']))}",
    ]
    return "\n".join(lines) + "\n"


# HTML.


def _svg(figure: Any) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]


def plots(data: dict[str, Any]) -> dict[str, str]:
    """Throughput, latency and memmap bytes over the run, as SVG text, by title."""
    import matplotlib  # noqa: PLC0415 -- optional: only --report needs it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    timeline = data["timeline"]
    t = [s["t_seconds"] for s in timeline]
    warmup_end = max((s["t_seconds"] for s in timeline if s["warmup"]), default=None)
    series: dict[str, list[tuple[str, list[float]]]] = {
        "Throughput (ops/s)": [("ops/s", [s["ops_per_second"] for s in timeline])],
        "Latency per interval (ms)": [
            (name, [s[f"{key}_seconds"] * 1000 for s in timeline])
            for name, key in (("p50", "p50"), ("p99", "p99"), ("max", "max"))
        ],
        "Memory map (MiB)": [
            (model, [s["memmap_bytes"].get(model, float("nan")) / 2**20 for s in timeline])
            for model in data["memmap"]["after"]
        ],
    }
    svgs: dict[str, str] = {}
    with matplotlib.rc_context({"svg.hashsalt": "foliod-load", "svg.fonttype": "path"}):
        for title, lines in series.items():
            figure, axes = plt.subplots(figsize=(8, 3.2))
            for label, values in lines:
                axes.plot(t, values, marker="o", markersize=3, label=label)
            if warmup_end is not None:
                axes.axvspan(0, warmup_end, color="0.9", label="warm-up")
            axes.set_title(title)
            axes.set_xlabel("seconds since start")
            axes.grid(True, alpha=0.3)
            axes.legend(loc="best", fontsize="small")
            svgs[title] = _svg(figure)
            plt.close(figure)
    return svgs


_STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{padding:.2em .8em;text-align:right;"
    "border-bottom:1px solid #ddd}td:first-child,th:first-child{text-align:left}"
    "pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(data: dict[str, Any], directory: Path) -> Path:
    """Writes DIR/index.html (summary and plots) and DIR/report.json; returns the page's path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    figures = "".join(
        f"<h2>{html.escape(title)}</h2><figure>{svg}</figure>" for title, svg in plots(data).items()
    )
    memmap = _html_table(["model", "before", "after", "change", "of RAM"], memmap_rows(data))
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>foliod-load {html.escape(data['workload'])}</title><style>{_STYLE}</style>"
        f"</head><body><h1>foliod-load: {html.escape(data['workload'])}</h1>"
        f"<pre>{html.escape(text(data))}</pre><h2>Memory map</h2>{memmap}{figures}"
        "</body></html>\n"
    )
    path = directory / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
