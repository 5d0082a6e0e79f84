"""A pipeline stage (`site-activity <stage>`) run as a child process: used by `dev` and by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dev_stack.embedded import stop_process
from site_activity.settings import Settings


class StageProcess:
    def __init__(self, stage: str, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.stage = stage
        self.settings = settings
        self.log_path = log_path
        self.env = {**os.environ, **settings.to_env(), **(extra_env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StageProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "command_line", self.stage],
                env=self.env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc:
            stop_process(self.proc, timeout=timeout)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()  # type: ignore[union-attr]
            self.proc.wait(10)  # type: ignore[union-attr]

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
