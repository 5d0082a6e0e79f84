"""Ingest: events/s through `POST /api/widget/track` (closed loop) next to a bare librdkafka producer of the same
bytes, and latency at half that load (open loop)."""

from __future__ import annotations

from typing import Any

from bench.harness import INGEST_P99_TARGET_MS, Loadgen, Row, bare_produce, post_until_accepted, say, verdict
from bench.pipeline.stack import Profile, Stack
from bench.workload import EVENTS_PER_BODY, encoded_messages, make_bodies
from site_activity.topics import Topics

INGEST_TARGET_EVENTS_S = 20_000


def section_ingest(stack: Stack, prof: Profile, out: dict[str, Any]) -> list[Row]:
    with stack.kafka("ingest") as broker:
        s = stack.settings("ingest", broker)
        topic = Topics.from_settings(s).raw_events
        widget_id, tenant_id = stack.widget("bench ingest")

        say(f"[ingest] bare producer: encoding {prof.bare_messages:,} events as the API does")
        messages = encoded_messages(make_bodies(widget_id, prof.bare_messages // EVENTS_PER_BODY, seed=1), tenant_id)
        say("[ingest] bare producer: producing")
        bare = bare_produce(s, topic, messages, "bare producer")
        del messages
        say(f"[ingest] bare producer: {bare['msgs_per_s']:,.0f} msgs/s")

        with stack.stage("api", s, s.http_port) as api:
            post_until_accepted(s.http_port, make_bodies(widget_id, 1, seed=2)[0])
            say(
                f"[ingest] closed loop: {prof.clients} clients x requests of {EVENTS_PER_BODY}, {prof.closed_seconds:.0f}s"
            )
            closed = Loadgen(
                "closed loop",
                s.http_port,
                widget_id,
                "--mode",
                "closed",
                "--clients",
                str(prof.clients),
                "--warmup",
                "2",
                "--duration",
                str(prof.closed_seconds),
                "--bodies",
                "3000",
            )
            with stack.profiler.record("ingest-closed", api), stack.cpu.measure("ingest closed loop"):
                closed_res = closed.wait(prof.closed_seconds + 40)
            say(f"[ingest] load generator used {closed_res['client_cores']:.2f} cores")
            half_rate = closed_res["events_per_s"] / 2 / EVENTS_PER_BODY
            say(f"[ingest] open loop at half that load: {half_rate:,.0f} requests/s, {prof.open_seconds:.0f}s")
            open_ = Loadgen(
                "open loop",
                s.http_port,
                widget_id,
                "--mode",
                "open",
                "--clients",
                "64",
                "--warmup",
                "1",
                "--rate",
                f"{max(half_rate, 1.0):.2f}",
                "--duration",
                str(prof.open_seconds),
                "--bodies",
                "3000",
                "--seed",
                "7",
            )
            with stack.profiler.record("ingest-open", api), stack.cpu.measure("ingest open loop"):
                open_res = open_.wait(prof.open_seconds + 40)
    out["ingest"] = {"bare_producer": bare, "closed_loop": closed_res, "open_loop_half_load": open_res}

    c_lat, o_lat = closed_res["latency_ms"], open_res["latency_ms"]
    ev_s = closed_res["events_per_s"]
    closed_errors = f", {closed_res['errors']} non-204" if closed_res["errors"] else ""
    open_ok = open_res["errors"] == 0 and o_lat["p99"] is not None and o_lat["p99"] < INGEST_P99_TARGET_MS
    return [
        Row(
            "ingest: events/s via POST /api/widget/track (closed loop)",
            f"{ev_s:,.0f} events/s{closed_errors}",
            f"{bare['msgs_per_s']:,.0f} msgs/s bare producer",
            f"{ev_s / bare['msgs_per_s']:.1%}",
            f">= {INGEST_TARGET_EVENTS_S:,} events/s",
            verdict(ev_s >= INGEST_TARGET_EVENTS_S and closed_res["errors"] == 0),
        ),
        Row(
            f"ingest: latency at max load ({prof.clients} clients)",
            f"p50 {c_lat['p50']} ms, p99 {c_lat['p99']} ms",
            "-",
            "-",
            "-",
            "info",
        ),
        Row(
            f"ingest: latency at half load ({open_res['rate_req_s'] * EVENTS_PER_BODY:,.0f} events/s, open loop)",
            f"p50 {o_lat['p50']} ms, p99 {o_lat['p99']} ms"
            + (f", {open_res['errors']} non-204" if open_res["errors"] else ""),
            "-",
            "-",
            f"p99 < {INGEST_P99_TARGET_MS:.0f} ms",
            verdict(open_ok),
        ),
    ]
