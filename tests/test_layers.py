"""The layers of docs/architecture.md point one way: no module imports from a layer above its own,
and no module reaches itself through its imports (a cycle, even one inside a package).

Read from the source with ``ast`` (imports inside functions included), so a new upward import
fails here, in the test run, rather than in a reader's head.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "kaika"

# Bottom to top; a module may import from its own layer and the layers below it.
LAYERS = [
    ["errors", "config", "atomic", "guard", "assets"],  # assets: shipped files, no code
    ["modeling"],
    ["data"],
    ["rundir"],
    ["training", "inference"],
    ["eval"],
    ["api"],  # the Python front door: the verbs of the command line as functions
    ["cli", "__main__"],
]
LEVEL = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """kaika.training.sft → training; kaika.rundir → rundir."""
    return module.split(".")[1]


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kaika."):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("kaika.")]
    return found


def test_every_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in SRC.iterdir() if not p.name.startswith((".", "_"))}
    parts = {p for p in parts if (SRC / p).is_dir() or (SRC / f"{p}.py").is_file()}
    assert parts <= set(LEVEL), f"add {sorted(parts - set(LEVEL))} to LAYERS (and to docs/architecture.md)"


def test_no_import_points_up():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts)
        if module in ("kaika.__init__",):
            continue
        own = LEVEL[part_of(module)]
        for line, target in imports(path):
            if LEVEL[part_of(target)] > own:
                upward.append(f"{path.relative_to(SRC.parent)}:{line} imports {target}")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_training_and_inference_do_not_import_each_other():
    """Peers on one layer: what both need (loading, verifying, reading a run) lives below them."""
    crossing = []
    for a, b in (("training", "inference"), ("inference", "training")):
        for path in sorted((SRC / a).rglob("*.py")):
            crossing += [
                f"{path.relative_to(SRC.parent)}:{n} imports {t}" for n, t in imports(path) if part_of(t) == b
            ]
    assert not crossing, "\n".join(crossing)


def module_graph() -> dict[str, set[str]]:
    """Every module of kaika to the kaika modules it imports (inside functions too: an import moved
    into a function to break a cycle still makes one)."""
    modules = {
        ".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in SRC.rglob("*.py")
    }
    graph = {}
    for module, path in modules.items():
        targets = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = [t for _, t in imports(path)]
        for node in ast.walk(tree):  # from kaika.cli import data: the submodule, not the package
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kaika"):
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                if subs and len(subs) == len(node.names):
                    found = [t for t in found if t != node.module] + subs
        for target in found:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != module and target in modules and target != "kaika":  # kaika: the lazy front door
                targets.add(target)
        graph[module] = targets
    return graph


def test_no_import_cycles():
    graph = module_graph()
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles (move what both need to where it belongs):\n" + "\n".join(cycles)
