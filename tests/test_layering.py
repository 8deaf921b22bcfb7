"""The package's layering: every import between tri_megatron's packages and top-level modules, lazy ones
(inside functions) included, goes from a higher layer to a strictly lower one. A new package or module
must be placed in ``LAYERS`` explicitly."""

import ast
import pathlib

import tri_megatron

ROOT = pathlib.Path(tri_megatron.__file__).parent

# bottom to top; a unit may import only units of lower layers (and itself)
LAYERS = [
    {"parent_death"},
    {"mcore_internals", "launcher", "checkpoint_files", "test_hooks", "_data_helpers", "_cuda_kernels"},
    {"compat"},
    {"data", "ops", "runtime", "local_dist"},
    {"config"},
    {"model", "perf"},
    {"training"},
    {"convert", "launch_checks"},
    {"dryrun"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _unit(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).parts
    return parts[0][:-3] if len(parts) == 1 else parts[0]


def import_edges() -> set:
    """(importing unit, imported unit, file) for every import of another tri_megatron unit."""
    edges = set()
    for f in ROOT.rglob("*.py"):
        me = _unit(f)
        if me == "__init__":
            continue
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
                if node.module == "tri_megatron":  # from tri_megatron import runtime, compat
                    names = [f"tri_megatron.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "tri_megatron" and len(parts) > 1 and parts[1] != me:
                    edges.add((me, parts[1], str(f.relative_to(ROOT))))
    return edges


def test_every_unit_is_placed():
    units = {_unit(f) for f in ROOT.rglob("*.py")} - {"__init__"}
    units |= {target for _, target, _ in import_edges()}
    assert units - set(RANK) == set(), "place these in LAYERS"


def test_imports_only_go_down():
    edges = import_edges()
    assert ("training", "perf", "training/loop.py") in edges  # the scan sees imports (a known one)
    assert ("config", "launcher", "config/run.py") in edges
    up = sorted(f"{where}: {me} imports {target}" for me, target, where in edges
                if me in RANK and target in RANK and RANK[target] >= RANK[me])
    assert up == []
