#!/usr/bin/env python3
"""Check Fortress's import structure: no import cycles, and no import from a lower layer up.

Every ``import`` in ``fortress/`` counts, also those inside functions and under
``TYPE_CHECKING``: a lazy import still ties two modules together. The layers and the rule are
described in docs/architecture.md; ``LAYERS`` below is that table. A package may import itself
and packages of a strictly lower rank; two packages of the same rank stay out of each other.

Usage: ``python scripts/check_layers.py [--graph]`` (exit 1 with a list of violations).
``bench/`` is checked for cycles among its own files too.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Rank of each top-level part of the package, lowest first (see docs/architecture.md).
LAYERS: dict[str, int] = {
    "config": 0,  # the typed fortress.yaml; imports nothing of Fortress
    "core": 1,  # request context, errors, ASGI helpers, admin check, server secret
    "store": 2,  # database engine and migrations
    "engines": 2,  # how to launch a replica process (llama.cpp, vLLM, sim)
    "sim": 2,  # the replica simulator (a test tool)
    "bedrock": 2,  # the OpenAI-compatible adapter in front of Bedrock (a local engine)
    "routing": 3,  # replicas, pools, health, outlier detection, balancers, engine load
    "access": 4,  # API keys and usage plans
    "audit": 4,  # journal, shipper, chain, queries
    "observe": 5,  # metrics, alarms, dashboard, access log
    "fleet": 6,  # the control plane: autoscaler, controllers, providers, supervisor
    "gateway": 6,  # the ASGI app and the relay
    "deploy": 7,  # the CDK app and the cost model generated from the config (beside the runtime)
    "runtime": 7,  # the one composition root
    "workers": 7,  # the master of several gateway processes on one port (beside the runtime)
    "cli": 8,  # the fortress command
}


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, module: str, is_package: bool, known: set[str]) -> Iterable[tuple[str, int]]:
    """(imported module of ``known``, line) for every import statement in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # `from pkg import sub` imports the module pkg.sub (pkg's __init__ only runs first);
            # `from pkg import name` imports pkg itself.
            names = [f"{target}.{a.name}" for a in node.names]
            subs = [n for n in names if n in known]
            yield from ((n, node.lineno) for n in subs)
            if len(subs) < len(names):
                yield target, node.lineno


def graph(base: Path, prefix: str) -> dict[str, set[tuple[str, int]]]:
    """module -> {(imported module of this tree, line)}. ``prefix`` is a package under ``base``,
    or a folder of scripts that import each other by file name (``bench``)."""
    folder = base / prefix
    if (folder / "__init__.py").exists():
        files = {module_name(p, base): p for p in folder.rglob("*.py")}
    else:
        files = {p.stem: p for p in folder.glob("*.py")}
    known = set(files)
    out: dict[str, set[tuple[str, int]]] = {}
    for mod, path in files.items():
        deps: set[tuple[str, int]] = set()
        for target, line in imports_of(path, mod, path.name == "__init__.py", known):
            if target in known and target != mod:
                deps.add((target, line))
        out[mod] = deps
    return out


def cycles(g: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _ in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward(g: dict[str, set[tuple[str, int]]]) -> tuple[list[str], list[str]]:
    """(violations of the layer rule, modules in no known layer)."""
    bad: list[str] = []
    unknown: list[str] = []
    for mod, deps in sorted(g.items()):
        src = layer_of(mod)
        if src is None:
            continue
        if src not in LAYERS:
            unknown.append(mod)
            continue
        for dep, line in sorted(deps):
            dst = layer_of(dep)
            if dst is None or dst == src:
                continue
            if dst not in LAYERS:
                continue  # reported as unknown on its own
            if LAYERS[dst] >= LAYERS[src]:
                rel = "a higher" if LAYERS[dst] > LAYERS[src] else "a sibling"
                bad.append(f"{mod}:{line} imports {dep} ({src} -> {rel} layer {dst})")
    return bad, unknown


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="store_true", help="print the layer-to-layer imports")
    args = ap.parse_args()
    g = graph(ROOT, "fortress")
    problems: list[str] = []
    for comp in cycles(g):
        problems.append("import cycle: " + " <-> ".join(comp))
    bad, unknown = upward(g)
    problems += bad
    problems += [f"{m}: not in any layer of scripts/check_layers.py LAYERS" for m in unknown]
    bench = graph(ROOT, "bench")
    for comp in cycles(bench):
        problems.append("import cycle in bench/: " + " <-> ".join(comp))
    if args.graph:
        edges: dict[tuple[str, str], int] = {}
        for mod, deps in g.items():
            for dep, _ in deps:
                a, b = layer_of(mod), layer_of(dep)
                if a and b and a != b:
                    edges[(a, b)] = edges.get((a, b), 0) + 1
        for (a, b), n in sorted(edges.items(), key=lambda e: (LAYERS.get(e[0][0], 99), e[0])):
            print(f"{a:>8} -> {b:<8} {n:3d} imports")
    modules = len(g)
    if problems:
        print(f"{len(problems)} layering problem(s) in {modules} modules:")
        for p in problems:
            print("  " + p)
        return 1
    print(f"imports OK: {modules} modules, 0 cycles, no import from a lower layer to a higher one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
