"""Avro encode rate: fastavro (schemas.codec) vs the Apache `avro` reference vs deprecated avro-python3, each in
its own process (bench/codec_bench.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.harness import ROOT, Row, say
from bench.pipeline.stack import Profile

CACHE_DIR = ROOT / "bench" / ".cache"
CODEC_BENCH = ROOT / "bench" / "codec_bench.py"


def section_codec(prof: Profile, out: dict[str, Any]) -> list[Row]:
    say("[codec] encodes/s: fastavro vs Apache avro vs avro-python3")
    fast = run_codec("fastavro", prof.codec_seconds)
    ref = run_codec("avro", prof.codec_seconds)
    legacy_path, why = install_avro_python3()
    legacy = run_codec("avro-python3", prof.codec_seconds, legacy_path) if legacy_path else None
    out["codec"] = {"fastavro": fast, "avro": ref, "avro_python3": legacy or {"error": why}}
    if "error" in fast or "error" in ref:
        return [
            Row(
                "codec: fastavro vs Apache avro",
                f"failed: {fast.get('error') or ref.get('error')}",
                "-",
                "-",
                "-",
                "FAIL",
            )
        ]
    rows = [
        Row(
            f"codec: fastavro {fast['version']} encodes/s (schemas.codec)",
            f"{fast['encodes_per_s']:,.0f} /s",
            f"{ref['encodes_per_s']:,.0f} /s Apache avro {ref['version']}",
            f"{fast['encodes_per_s'] / ref['encodes_per_s']:.1f}x",
            "-",
            "info",
        )
    ]
    if legacy is None or "error" in legacy:
        reason = why if legacy is None else legacy["error"]
        rows.append(
            Row("codec: avro-python3 (deprecated) encodes/s", f"not installable here: {reason}", "-", "-", "-", "n/a")
        )
    else:
        rows.append(
            Row(
                f"codec: avro-python3 {legacy['version']} (deprecated) encodes/s",
                f"{legacy['encodes_per_s']:,.0f} /s",
                f"{fast['encodes_per_s']:,.0f} /s fastavro",
                f"fastavro {fast['encodes_per_s'] / legacy['encodes_per_s']:.1f}x faster",
                "-",
                "info",
            )
        )
    return rows


def run_codec(lib: str, seconds: float, pythonpath: Path | None = None) -> dict[str, Any]:
    env = {**os.environ}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run(
        [sys.executable, str(CODEC_BENCH), "--lib", lib, "--seconds", str(seconds)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )
    lines = proc.stdout.strip().splitlines()
    result: dict[str, Any] = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if proc.returncode != 0 or not result or "error" in result:
        errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        reason = result.get("error") or (errors[-1] if errors else f"exit {proc.returncode}")
        say(f"    [codec] {lib}: {reason}")
        return {"lib": lib, "error": reason[:160]}
    say(f"    [codec] {lib} {result['version']}: {result['encodes_per_s']:,.0f} encodes/s")
    return result


def install_avro_python3() -> tuple[Path | None, str]:
    """avro-python3 shares the import name `avro` with the reference library: keep it in its own directory."""
    target = CACHE_DIR / "avro-python3"
    if (target / "avro" / "__init__.py").exists():
        return target, ""
    say("    [codec] installing avro-python3 into bench/.cache (once)")
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
                str(target),
                "avro-python3",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return None, "pip install timed out"
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return None, (lines[-1] if lines else f"pip exited with {proc.returncode}")[:160]
    return target, ""
