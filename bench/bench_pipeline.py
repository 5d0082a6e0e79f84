"""Pipeline benchmark: ingest API, sink, end to end, and the Avro codec, each next to its limit measured
in the same run on the same embedded stack (own broker + Postgres on free ports, started and stopped here;
SITE_ACTIVITY_EMBEDDED_BROKER=kafka|tansu picks the broker, default Apache Kafka where Java 17+ is found).

    .venv/bin/python bench/bench_pipeline.py            # full run, about 4-6 minutes
    .venv/bin/python bench/bench_pipeline.py --quick    # smoke test, about 1.5 minutes

Prints a table (and a markdown copy for the README) and writes bench/results/pipeline.json.
See bench/README.md for what each row means."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402
    NOISY_OTHER_CORES,
    RESULTS_DIR,
    CpuMeter,
    Profiler,
    Row,
    environment,
    markdown_table,
    say,
    text_table,
)
from bench.pipeline.codec import section_codec  # noqa: E402
from bench.pipeline.e2e import processors_cost_rows, section_e2e, section_e2e_processors  # noqa: E402
from bench.pipeline.ingest import section_ingest  # noqa: E402
from bench.pipeline.sink import section_sink  # noqa: E402
from bench.pipeline.stack import FULL, QUICK, Stack  # noqa: E402

SECTIONS = ("ingest", "sink", "e2e", "e2e-processors", "codec")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke-test run (~1.5 min)")
    p.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) afterwards")
    p.add_argument("--py-spy", action="store_true", help="profile the stages while measured (bench/results/profiles)")
    args = p.parse_args(argv)
    prof = QUICK if args.quick else FULL
    sections = args.only or list(SECTIONS)

    # SIGTERM unwinds like Ctrl-C, so every child (broker, Postgres, stages, load generator) is stopped by PID.
    signal.signal(signal.SIGTERM, _interrupt)
    out: dict[str, Any] = {"profile": "quick" if args.quick else "full", "settings": asdict(prof), "env": environment()}
    cpu = CpuMeter()
    out["cpu"] = cpu.phases
    rows: list[Row] = []
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="sa-bench-"))
    say(f"pipeline benchmark ({out['profile']}), work dir {workdir}")
    failed = False
    try:
        with contextlib.ExitStack() as exit_stack:
            stack = Stack(workdir, exit_stack, Profiler(args.py_spy), cpu)
            if set(sections) - {"codec"}:
                stack.start_postgres()
            for name, run in (
                ("ingest", section_ingest),
                ("sink", section_sink),
                ("e2e", section_e2e),
                ("e2e-processors", section_e2e_processors),
            ):
                if name in sections:
                    t0 = time.monotonic()
                    try:
                        rows += run(stack, prof, out)
                    except Exception as exc:  # report the section as failed, carry on with the next
                        failed = True
                        say(f"[{name}] FAILED: {exc}")
                        rows.append(
                            Row(f"{name}: section failed", str(exc).splitlines()[0][:120], "-", "-", "-", "FAIL")
                        )
                    say(f"[{name}] done in {time.monotonic() - t0:.0f}s")
            rows += processors_cost_rows(out)
            if "codec" in sections:
                rows += section_codec(prof, out)
    except KeyboardInterrupt:
        say("interrupted; stopped everything this benchmark started")
        return 130
    finally:
        save_logs(workdir)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out["rows"] = [asdict(r) for r in rows]
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "pipeline.json").write_text(json.dumps(out, indent=2, default=str))
    print()
    print(f"Pipeline benchmark ({out['profile']}, {out['env']['cpus']} CPUs, {out['elapsed_s']:.0f}s):")
    print(text_table(rows))
    print()
    print(markdown_table(rows))
    noisy = {phase: c["other_cores"] for phase, c in cpu.phases.items() if c["other_cores"] > NOISY_OTHER_CORES}
    if noisy:
        print(
            "\nWARNING: other processes were busy during "
            + ", ".join(f"{p} ({c:.2f} cores)" for p, c in noisy.items())
            + ": on 2 cores this shows up as latency tails and lower rates; rerun on an idle machine to publish."
        )
    print(f"\nraw results: {RESULTS_DIR / 'pipeline.json'}; stage logs: {RESULTS_DIR / 'logs'}")
    return 1 if failed or any(r.result == "FAIL" for r in rows) else 0


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def save_logs(workdir: Path) -> None:
    """Stage and broker logs outlive the temp dir, for looking into a slow or failed run."""
    dest = RESULTS_DIR / "logs"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    for log in [*workdir.glob("*.log"), *workdir.glob("*.metrics.txt")]:
        shutil.copy2(log, dest / log.name)
    if (workdir / "pg" / "postgres.log").exists():
        shutil.copy2(workdir / "pg" / "postgres.log", dest / "postgres.log")


if __name__ == "__main__":
    sys.exit(main())
