"""The benchmark's report: the human table (``report.txt``) and the plot (``bench.png``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def render(results: dict[str, Any]) -> str:
    """The human table, as plain text."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=180, file=open(os.devnull, "w"))  # noqa: SIM115
    m = results["machine"]
    console.print(
        f"lastseen bench {results['started']}  cores={m['cores']} memory={m['memory_gib']} GiB "
        f"python={m['python']} postgresql={results.get('postgresql', '?')} "
        f"open files={m.get('open_file_limit', '?')} ephemeral ports={m.get('ephemeral_ports')}"
    )
    scenarios = results["scenarios"]
    if "ingest" in scenarios:
        s = scenarios["ingest"]
        table = Table(
            title=f"ingest: {s['ids_per_callback']}-id bodies, {s['connections']} connections"
        )
        columns = ("round", "path", "ok/s", "p50 ms", "p99 ms", "max ms", "cpu % by process")
        for column in (*columns, "cpu µs per request", "WAL bytes per request"):
            table.add_column(column)
        for r in s["rounds"]:
            lat = r["latency_ms"]
            cpu = " ".join(f"{k}={v}" for k, v in r["cpu_percent"].items())
            table.add_row(
                str(r["round"] + 1),
                r["path"],
                f"{r['ok_per_s']:.0f}",
                str(lat["p50"]),
                str(lat["p99"]),
                str(lat["max"]),
                cpu,
                " ".join(f"{k}={v:.0f}" for k, v in r.get("cpu_us_per_request", {}).items()),
                str(r.get("wal_bytes_per_request") or "-"),
            )
        console.print(table)
        console.print(
            f"durable/do-nothing = {s['durable_per_s_median']:.0f}/{s['noop_per_s_median']:.0f}"
            f" = {s['ratio']:.2f} (goal >= 0.7); durable p99 {s['durable_p99_ms_median']} ms"
            f" (goal < 20 with 64 connections); {s['acknowledged']} acknowledged,"
            f" {s['stored_rows']} rows stored"
        )
        if "signed_ratio" in s:
            console.print(
                f"signed/unsigned = {s['signed_per_s_median']:.0f}/{s['durable_per_s_median']:.0f}"
                f" = {s['signed_ratio']:.2f} (goal >= 0.8): every request signed, its webhook-id "
                "checked and recorded in the group commit"
            )
    if "pipeline" in scenarios:
        s = scenarios["pipeline"]
        for name, run in s["distributions"].items():
            lo, hi = s["upstream_latency_s"]
            title = (
                f"pipeline, {name} ids (up to {run['max_ids_per_callback']} per callback from "
                f"{run['id_universe']:,}), upstream {lo}-{hi} s"
            )
            table = Table(title=title)
            for column in (
                "callbacks/s",
                "lookups/s",
                "ids resolved/s",
                "coalesced/s",
                "inbox end (max)",
                "lag over upstream p50/p99 ms",
                "result lag p50/p99 ms",
                "keeping up",
                "cpu % by process",
            ):
                table.add_column(column)
            for step in run["steps"]:
                lag, res = step["lag_over_upstream_ms"], step["result_lag_ms"]
                table.add_row(
                    f"{step['callbacks_per_s']:g}",
                    f"{step['lookups_per_s']:.0f}",
                    f"{step['ids_resolved_per_s']:.0f}",
                    f"{step['coalesced_per_s']:.0f}",
                    f"{step['inbox_pending_end']:.0f} ({step['inbox_pending_max']:.0f})",
                    f"{lag['p50']}/{lag['p99']}",
                    f"{res['p50']}/{res['p99']}",
                    "yes" if step["keeping_up"] else "NO",
                    " ".join(f"{k}={v}" for k, v in step["cpu_percent"].items()),
                )
            console.print(table)
            console.print(f"most lookups/s sustained: {run['max_sustained_lookups_per_s']:.0f}")
            for step in run["steps"]:
                per = step.get("cpu_us_per_lookup", {})
                console.print(
                    f"  {step['callbacks_per_s']:g} callbacks/s: cpu µs per lookup "
                    + " ".join(f"{k}={v:.0f}" for k, v in per.items())
                )
    if "tls" in scenarios:
        s = scenarios["tls"]
        if "skipped" in s:
            console.print(f"tls: skipped, {s['skipped']}")
        else:
            for step in s["steps"]:
                console.print(
                    f"tls round {step['round'] + 1} {step['scheme']}: "
                    f"{step['lookups_per_s']:.0f} lookups/s, cpu µs per lookup "
                    + " ".join(f"{k}={v:.0f}" for k, v in step["cpu_us_per_lookup"].items())
                )
            for scheme, cpu in s["client_cpu_us_per_get"].items():
                console.print(
                    f"tls: lookup client alone, {scheme}: cpu µs per GET "
                    f"{cpu['new_connection']:.0f} on a new connection, "
                    f"{cpu['pooled_connection']:.0f} on a pooled one"
                )
            console.print(
                f"tls: worker cpu µs per lookup, https/http = "
                f"{s['worker_cpu_us_per_lookup_https']:.0f}/{s['worker_cpu_us_per_lookup_http']:.0f}"
                f" = {s['https_over_http']} ({s['callbacks_per_s']:g} callbacks/s of unique ids)"
            )
    if "expiry" in scenarios:
        s = scenarios["expiry"]
        late = s["after_ttl_ms"]
        console.print(
            f"expiry: {s['objects']} objects, TTL {s['ttl_s']} s; deleted after the TTL by "
            f"p50 {late['p50']} ms, p99 {late['p99']} ms, max {late['max']} ms "
            f"(polled every {s['poll_interval_ms']} ms); {s['deleted_before_ttl']} before it"
        )
    if "soak" in scenarios:
        s = scenarios["soak"]
        first = s["samples"][0]["rss_mib"] if s["samples"] else {}
        last = s["samples"][-1]["rss_mib"] if s["samples"] else {}
        rss = ", ".join(f"{k} {first.get(k)} -> {last.get(k)} MiB" for k in last)
        console.print(
            f"soak: {s['rate_per_s']} callbacks/s for {s['seconds']} s; RSS {rss}; growth over "
            f"the second half {s['rss_growth_second_half_mib']} MiB; inbox max "
            f"{s['inbox_pending_max']:.0f}"
        )
    if "crash" in scenarios:
        s = scenarios["crash"]
        late = s["appeared_after_s"]
        console.print(
            f"crash: {s['kills']['worker']} worker and {s['kills']['service']} service kills in "
            f"{s['seconds']:g} s; {s['acknowledged_ids']} ids acknowledged, "
            f"{s['never_appeared']} never in objects; appeared after p50 {late['p50']} s, "
            f"p99 {late['p99']} s, max {late['max']} s; {s['later_than_10_s']} later than 10 s"
        )
    if "upstream-outage" in scenarios:
        s = scenarios["upstream-outage"]
        late = s["caught_up_after_s"]
        console.print(
            f"upstream outage: {s['outage_s']:g} s of 503s, TTL {s['ttl_s']:g} s, {s['ids']} ids "
            f"every second; {s['disappeared']} rows disappeared; every id caught up within "
            f"p50 {late['p50']} s, max {late['max']} s of the recovery"
        )
    if "hostile-upstream" in scenarios:
        s = scenarios["hostile-upstream"]
        late = s["appeared_after_s"]
        first, last = s["rss_mib_first"], s["rss_mib_last"]
        rss = ", ".join(f"{k} {first[k]} -> {last[k]} MiB" for k in first if k in last)
        console.print(
            f"hostile upstream: {s['seconds']:g} s, {s['well_answered_ids']} well-answered ids, "
            f"{s['never_appeared']} never in objects; appeared after p50 {late['p50']} s, "
            f"p99 {late['p99']} s, max {late['max']} s; lookups in flight up to "
            f"{s['lookups_in_flight_max']:.0f}; RSS {rss}"
        )
    if "database-outage" in scenarios:
        s = scenarios["database-outage"]
        for n, run in enumerate(s["runs"], 1):
            reply = run["reply_ms"]
            console.print(
                f"database outage {n}: {s['outage_s']:g} s away; {run['acknowledged']} of "
                f"{run['posts']} POSTs acknowledged ({run['acknowledged_from_the_spool']} from "
                f"the spool), reply p99 {reply['p99']} ms, max {reply['max']} ms; spool drained "
                f"{run['spool_drained_after_s']} s after; {run['never_appeared']} of "
                f"{run['acknowledged_ids']} ids never in objects, "
                f"{run['appeared_after_the_ttl']} after their TTL, max "
                f"{run['appeared_after_s']['max']} s"
            )
        console.print(f"database outage: error log lines {len(s['error_log_lines'])}")
    if "nemesis" in scenarios:
        s = scenarios["nemesis"]
        for configuration, faults in s["configurations"].items():
            console.print(_nemesis_table(configuration, faults, s))
    if "overload" in scenarios:
        s = scenarios["overload"]
        console.print(
            f"overload: {s['overload_rate_per_s']:g} callbacks/s for {s['overload_s']:g} s, then "
            f"{s['normal_rate_per_s']:g}/s; reply p99 {s['reply_p99_ms_overload']} ms "
            f"(after: {s['reply_p99_ms_after']} ms); inbox up to {s['inbox_pending_max']:.0f}; "
            f"RSS peak {s['rss_mib_peak']}, end {s['rss_mib_end']}; fresh again after "
            f"{s['fresh_again_after_s']} s; {s['callbacks_expired']:.0f} callbacks expired"
        )
    if "scale" in scenarios:
        s = scenarios["scale"]
        for layout, run in s["layouts"].items():
            for step in run["steps"]:
                cpu = " ".join(f"{k}={v}" for k, v in step["cpu_percent"].items())
                console.print(
                    f"scale, {layout}: {step['callbacks_per_s']:g} callbacks/s -> "
                    f"{step['lookups_per_s']:.0f} lookups/s, lag p99 "
                    f"{step['lag_over_upstream_p99_ms']} ms, inbox {step['inbox_pending_end']:.0f};"
                    f" cpu % {cpu}"
                )
    if "reaper" in scenarios:
        s = scenarios["reaper"]
        console.print(
            f"reaper: {s['pending_ids']:,} pending ids, {s['expired_objects']:,} expired objects "
            f"({s['protected_objects']:,} protected); rounds "
            + ", ".join(
                f"{r['ms']} ms ({r['deleted']:.0f} deleted, {r['kept']:.0f} kept)"
                for r in s["rounds"]
            )
        )
    if "box" in scenarios:
        s = scenarios["box"]
        for r in s["rounds"]:
            console.print(
                f"box round {r['round'] + 1}: {r['processed_per_s']:.0f} callbacks/s processed "
                f"vs {r['noop_per_s']:.0f}/s do-nothing = {r['ratio']:.2f}; reply p99 "
                f"{r['reply_p99_ms']} ms; cpu µs per callback "
                + " ".join(f"{k}={v:.0f}" for k, v in r["cpu_us_per_callback"].items())
                + f"; WAL {r.get('wal_bytes_per_callback') or '-'} bytes per callback"
            )
        console.print(
            f"box: ratio {s['ratio_median']:.2f} (median; goal >= 0.4), every callback "
            f"processed: {s['every_callback_processed']}"
        )
    if "inflight" in scenarios:
        s = scenarios["inflight"]
        console.print(
            f"inflight: {s['lookups_in_flight_peak']:,.0f} lookups in flight (asked for "
            f"{s['ids']:,}); worker RSS grew {s['worker_mib_for_lookups']} MiB, "
            f"{s['worker_kib_per_lookup_in_flight']} KiB per lookup in flight; every id looked "
            f"up: {s['all_looked_up']}"
        )
    return console.export_text()


def _nemesis_table(configuration: str, faults: dict[str, Any], s: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title=f"nemesis, {configuration} configuration: each fault {s['fault_s']:g} s, "
        f"TTL {s['ttl_s']:g} s"
    )
    columns = ("fault", "acknowledged", "replies", "ids missed", "worst id s",
               "reply p99 ms", "/ready worst s")  # fmt: skip
    for column in columns:
        table.add_column(column)
    for name, f in faults.items():
        if "skipped" in f:
            table.add_row(name, f"skipped: {f['skipped']}")
            continue
        table.add_row(
            name,
            f"{f['acknowledged']}/{f['posts']}",
            " ".join(f"{k}x{v}" for k, v in f["statuses"].items()),
            f"{f['missed_ids']}/{f['acknowledged_ids']}",
            str(f["worst_id_delay_s"]),
            str(f["reply_p99_ms"]),
            str(f["ready_worst_s"]),
        )
    lines = []
    for name, e in faults.get("skew", {}).get("expiry", {}).items():
        late = e["after_ttl_s"]
        lines.append(
            Text(
                f"skew: ids taken by the instance {faults['skew']['skew_s']:g} s {name}: "
                f"{e['deleted']} of {e['ids']} deleted, {late['min']} to {late['max']} s "
                f"(p50 {late['p50']} s) after their TTL; {e['deleted_before_ttl']} before it"
            )
        )
    return Group(table, *lines)


def plot(results: dict[str, Any], path: Path) -> bool:
    """Throughput and lag over time as a PNG; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = results["scenarios"]
    panels = [n for n in ("ingest", "pipeline", "soak") if n in scenarios]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for ax, name in zip((a[0] for a in axes), panels, strict=True):
        s = scenarios[name]
        if name == "ingest":
            labels = [f"{r['path']} #{r['round'] + 1}" for r in s["rounds"]]
            ax.bar(
                labels,
                [r["ok_per_s"] for r in s["rounds"]],
                color=["tab:gray" if r["path"] == "/noop" else "tab:blue" for r in s["rounds"]],
            )
            ax.set_ylabel("acknowledged / s")
            ax.set_title(f"ingest: durable vs do-nothing, ratio {s['ratio']:.2f}")
        elif name == "pipeline":
            twin = ax.twinx()
            offset = 0.0
            for dist, run in s["distributions"].items():
                for step in run["steps"]:
                    t = [offset + p["t"] for p in step["timeline"]]
                    ax.plot(t, [p["lookups_per_s"] for p in step["timeline"]], color="tab:blue")
                    twin.plot(
                        t,
                        [max(p["lag_over_upstream_p99_ms"] or 0, 1.0) for p in step["timeline"]],
                        color="tab:red",
                        alpha=0.6,
                    )
                    ax.axvline(offset, color="lightgray", lw=0.8)
                    ax.text(
                        offset,
                        0,
                        f"{dist} {step['callbacks_per_s']:g}/s",
                        fontsize=7,
                        rotation=90,
                        va="bottom",
                    )
                    offset = t[-1] if t else offset + step["steady_seconds"]
            ax.set_ylabel("lookups / s", color="tab:blue")
            twin.set_ylabel("lag over upstream p99 (ms)", color="tab:red")
            twin.set_yscale("log")
            ax.set_title("pipeline: rising callback rates")
            ax.set_xlabel("seconds")
        else:
            t = [p["t"] for p in s["samples"]]
            for proc in s["samples"][-1]["rss_mib"] if s["samples"] else {}:
                ax.plot(t, [p["rss_mib"].get(proc, 0) for p in s["samples"]], label=f"{proc} RSS")
            ax.set_ylabel("MiB")
            twin = ax.twinx()
            twin.plot(
                t,
                [p["inbox_pending"] for p in s["samples"]],
                color="tab:red",
                alpha=0.5,
                label="inbox",
            )
            twin.set_ylabel("inbox pending", color="tab:red")
            ax.legend(loc="upper left")
            ax.set_title(f"soak: {s['rate_per_s']} callbacks/s")
            ax.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
