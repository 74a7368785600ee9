"""The module boundaries of DESIGN.md, pinned: who may import whom, and no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "fcgispawn"

#: DESIGN.md's arrows. Deviations, each with its reason:
#: - supervisor -> process: the forked child drops privileges and resets signal state before
#:   exec, and process.py owns those process-wide changes.
#: - spawner: the wiring between cli and supervisor (bind, identities, detach, pid file), kept
#:   out of cli.py so that cli.py stays parsing and printing only.
#: - __main__ -> config, runtime, errors, systemd: a --wsgi worker started by the supervisor is
#:   served from config.WORKER_ENV without cli.py, so workers and templates never import click;
#:   an app that does not load is logged there as the worker's other lines are (systemd.py's
#:   log functions) before the worker exits with config.APP_LOAD_EXIT.
#: - spawner -> client: the supervisor's pool probe (an FCGI_GET_VALUES on the listener) is
#:   made there and injected, so that the supervisor itself still knows no FastCGI.
#: - template: preload mode's fork protocol. The worker side runs in the runtime (which forks
#:   workers from a process that imported the app); the supervisor imports only its constants.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "protocol": set(),
    "wsgi": set(),
    "sockets": {"errors"},
    "systemd": {"errors"},
    "process": {"errors"},
    "config": {"sockets", "errors"},
    "template": set(),
    "supervisor": {"sockets", "systemd", "process", "template", "errors"},
    "server": {"protocol", "wsgi"},
    "runtime": {"server", "protocol", "wsgi", "sockets", "systemd", "template", "errors"},
    "client": {"protocol"},
    "spawner": {"config", "process", "systemd", "sockets", "supervisor", "client", "errors"},
    "cli": {"config", "errors", "runtime", "spawner", "systemd", "__init__"},
    "__init__": {"server", "runtime"},
    "__main__": {"cli", "config", "runtime", "errors", "systemd"},
}


def imports_of(path: Path) -> set[str]:
    """fcgispawn modules imported anywhere in the file (lazy imports inside functions count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "fcgispawn":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("fcgispawn."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fcgispawn."):
                    found.add(alias.name.split(".")[1])
    modules = {p.stem for p in PKG.glob("*.py")}
    # ``from fcgispawn import __version__`` is the package itself.
    return {name if name in modules else "__init__" for name in found} - {path.stem}


@pytest.mark.parametrize("path", sorted(PKG.glob("*.py")), ids=lambda p: p.stem)
def test_module_imports_only_what_design_allows(path: Path) -> None:
    assert path.stem in ALLOWED, f"new module {path.stem}: add it to DESIGN.md and ALLOWED"
    extra = imports_of(path) - ALLOWED[path.stem]
    assert not extra, f"{path.stem} imports {sorted(extra)}, which DESIGN.md does not allow"


def test_import_graph_has_no_cycles() -> None:
    graph = {p.stem: imports_of(p) for p in PKG.glob("*.py")}
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in done:
            return
        assert node not in visiting, f"import cycle: {' -> '.join([*trail, node])}"
        visiting.add(node)
        for dep in graph.get(node, set()):
            # The lazy ``fcgispawn.serve`` attribute is not an import-time edge.
            if node == "__init__":
                continue
            visit(dep, [*trail, node])
        visiting.discard(node)
        done.add(node)

    for module in graph:
        visit(module, [])
