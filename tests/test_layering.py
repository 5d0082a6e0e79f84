"""The import layers (ARCHITECTURE.md, *Layers*), checked on the source: every `import` statement, at module
level or inside a function, is read from the AST, so a lazy import cannot hide an upward dependency.

    roof     command_line, dev_stack       may import anything below
    stages   producer_api, stream_processors, sink, webhooks, console, widget
    kernel   site_activity, schemas        imports only the kernel and third-party libraries
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ("site_activity", "schemas")
STAGES = ("producer_api", "stream_processors", "sink", "webhooks", "console", "widget")
ROOF = ("command_line", "dev_stack")
OURS = KERNEL + STAGES + ROOF

# Stage -> stage imports that exist today, each with why; nothing else may be added. Shrink this list as they go.
KNOWN_STAGE_EDGES = {
    ("producer_api", "widget"): "the API serves the browser script (widget.assets)",
    ("console", "webhooks"): "endpoint rules shared by the console and the CLI (webhooks.endpoints)",
}


def modules(package: str) -> Iterator[Path]:
    yield from sorted((ROOT / package).rglob("*.py"))


def imported_packages(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level package) of every absolute import in `path` that names one of our packages."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in OURS:
                yield node.lineno, top


def violations(
    packages: tuple[str, ...], allowed: set[str] | None = None, known: dict[tuple[str, str], str] | None = None
) -> list[str]:
    found = []
    for package in packages:
        for path in modules(package):
            for line, target in imported_packages(path):
                if target == package or (allowed is not None and target in allowed):
                    continue
                if known is not None and (package, target) in known:
                    continue
                found.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return found


def test_every_package_is_in_a_layer() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages <= set(OURS), f"put these in a layer: {sorted(packages - set(OURS))}"


def test_the_kernel_imports_no_stage_no_roof_and_not_the_widget() -> None:
    assert violations(KERNEL, allowed=set(KERNEL)) == []


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_the_kernel_but_no_other_stage_and_not_the_roof(stage: str) -> None:
    assert violations((stage,), allowed=set(KERNEL), known=KNOWN_STAGE_EDGES) == []


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from dev_stack.embedded import free_port\n    import sink.main\n")
    assert list(imported_packages(source)) == [(2, "dev_stack"), (3, "sink")]
