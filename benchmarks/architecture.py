"""The shape of the package, measured. Prints one JSON line.

    python benchmarks/architecture.py [--no_trace]

- `batch_path_files`: package files whose functions run while `launch` trains the tiny recipe
  for 2 steps with one eval (gin/train/tiny_cpu.gin), imports excluded: the files a reader
  follows for one training batch, from the command line to the optimizer update and back.
- `import_cycles`, `backward_imports`, `local_imports`: from the source, statically. Layers,
  bottom to top (an import may point down or sideways, never up, never in a cycle; train
  never imports infer):
      0  errors, files, net, secrets, config.*, jobs (the registry: the @job decorator)
      1  model.*, data.*, parallel.*, plan.* (topologies, FLOPs, sharding tables), cache,
         monitor, hub.*
      2  train.*, infer.*
      3  every other *jobs module, quickstart, cli, launch, dashboard.*
  A local import is an `import llamahome...` inside a function: it only hides a cycle.
- `functions_over_60`: functions longer than 60 lines, as module.function.

tests/unit/test_architecture.py keeps cycles, backward and local imports at zero.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llamahome"
TOP = ("llamahome.quickstart", "llamahome.cli", "llamahome.launch",
       "llamahome.dashboard")
MIDDLE = ("llamahome.model", "llamahome.data", "llamahome.parallel", "llamahome.plan",
          "llamahome.cache", "llamahome.monitor", "llamahome.hub")
UPPER = ("llamahome.train", "llamahome.infer")


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> int:
    """0 bottom ... 3 top, as in the module doc."""
    if module == "llamahome.jobs":
        return 0  # the job registry: the @job decorator every job module uses
    if _under(module, TOP) or module.endswith("jobs"):
        return 3
    if _under(module, UPPER):
        return 2
    if _under(module, MIDDLE):
        return 1
    return 0


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """(module -> package modules it imports, [(module, target) imported inside a function])."""
    mods = modules(package)
    root = package.name

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    local: list[tuple[str, str]] = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, in_function in _walk(tree, False):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = _imported(node, module, path.name == "__init__.py")
            targets = {resolve(n) for n in names if n == root or n.startswith(root + ".")}
            targets -= {None, module, root}
            graph[module] |= targets
            local += [(module, t) for t in sorted(targets) if in_function]
    return graph, local


def _is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`: runs as the module `__main__`, not as an import of this one."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _walk(node: ast.AST, in_function: bool):
    for child in ast.iter_child_nodes(node):
        if _is_main_block(child):
            continue
        yield child, in_function
        yield from _walk(child, in_function or isinstance(child, (ast.FunctionDef,
                                                                   ast.AsyncFunctionDef)))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def backward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a higher layer, and train -> infer."""
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer(target) > layer(module) or (
                    _under(module, ("llamahome.train",)) and _under(target, ("llamahome.infer",))):
                bad.append((module, target))
    return bad


def long_functions(package: Path = PACKAGE, limit: int = 60) -> list[str]:
    out = []
    for module, path in modules(package).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    out.append(f"{module}.{node.name} ({length} lines)")
    return sorted(out)


def batch_path_files() -> list[str]:
    """Package files whose functions run while launch trains 2 steps of the tiny recipe."""
    from absl import flags  # noqa: PLC0415  (the trace needs the package only when asked)

    from llamahome import cli  # noqa: PLC0415

    seen: set[str] = set()
    prefix = str(PACKAGE) + os.sep

    def profile(frame, event, arg):
        del arg
        code = frame.f_code
        if event == "call" and code.co_filename.startswith(prefix) and code.co_name != "<module>":
            seen.add(os.path.relpath(code.co_filename, PACKAGE))

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["launch", "--gin_file=gin/train/tiny_cpu.gin", "--gin_param=train.steps=2",
                "--gin_param=train.eval_every=2", "--gin_param=train.progress_bar=False",
                f"--gin_param=launch.run_dir='{tmp}/run'",
                f"--gin_param=CacheManager.root='{tmp}/cache'", "--env_file="]
        flags.FLAGS(argv)
        cli.import_configurables()  # imports are not the path; registration is done by then
        sys.setprofile(profile)
        try:
            status = cli.main(argv[:1])
        finally:
            sys.setprofile(None)
    if status != 0:
        raise SystemExit(f"the traced train run failed with exit status {status}")
    return sorted(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no_trace", action="store_true", help="skip the traced train run")
    args = parser.parse_args()
    os.chdir(ROOT)
    graph, local = import_graph()
    path = [] if args.no_trace else batch_path_files()
    print(json.dumps({
        "benchmark": "architecture",
        "package_files": len(modules()),
        "batch_path_files": len(path) if path else None,
        "batch_path": path,
        "import_cycles": cycles(graph),
        "backward_imports": backward_imports(graph),
        "local_imports": local,
        "functions_over_60": long_functions(),
    }))


if __name__ == "__main__":
    main()
