"""The library's import structure (docs/architecture.md): the flow calls the pipeline, the pipeline the
stage packages (data/, models/, evaluation/, serving/), and everything the shared modules at the top. No
cycles, imports inside functions included; every import points to the module's own layer or a lower
one; models/ never imports evaluation/ or serving/; nothing in the library imports Metaflow. Read from
the source with `ast`, so a function-level import that would only fail when its function runs is caught
here too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rlhf_lightning"

# What every stage uses: the top of the package, below every stage.
SHARED = {"rlhf_lightning", "rlhf_lightning.config", "rlhf_lightning.cache", "rlhf_lightning.chat",
          "rlhf_lightning.hardware", "rlhf_lightning.task_prompts", "rlhf_lightning.judge", "rlhf_lightning.stats",
          "rlhf_lightning.tracking", "rlhf_lightning.checkpoints", "rlhf_lightning.pair_encoding",
          "rlhf_lightning.vllm_settings"}
# Lowest first (docs/architecture.md, "What may import what"): shared, then the stages in the order they
# may use each other, then the pipeline and the CLI that drive them. A package stands for every module in it.
LAYERS = [
    SHARED,
    {"rlhf_lightning.models"},
    {"rlhf_lightning.data"},
    {"rlhf_lightning.evaluation"},
    {"rlhf_lightning.serving"},
    {"rlhf_lightning.pipeline", "rlhf_lightning.__main__"},
]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> dict[str, int]:
    """{imported module of the library or third-party top-level name: line}, at any depth of the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from rlhf_lightning import tracking` imports the module rlhf_lightning.tracking
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            # the longest known module that is the target or contains it (a.b.c -> a.b when c is a name)
            parts = target.split(".")
            resolved = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known),
                            parts[0] if parts[0] != "rlhf_lightning" else None)
            if resolved and resolved != name:
                found.setdefault(resolved, node.lineno)
    return found


def layer(name: str) -> int:
    for rank, members in enumerate(LAYERS):
        if name in members or any(name.startswith(m + ".") for m in members if m != "rlhf_lightning"):
            return rank
    raise AssertionError(f"{name} is in no layer: add it to docs/architecture.md and LAYERS")


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer(name)


def test_no_import_cycles(graph):
    library = {name: {d for d in deps if d in graph} for name, deps in graph.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(library[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(library):
        if name not in state:
            visit(name, [name])


def test_imports_point_down(graph):
    upward = [f"{name} imports {dep} (line {line}): layer {layer(name)} -> {layer(dep)}"
              for name, deps in graph.items() for dep, line in deps.items()
              if dep in graph and layer(dep) > layer(name)]
    assert not upward, "\n".join(upward)


def test_the_library_never_imports_metaflow(graph):
    assert not [f"{name} (line {line})" for name, deps in graph.items() for dep, line in deps.items()
                if dep == "metaflow"]


def test_the_checker_sees_function_level_imports(tmp_path):
    """The rules hold because the parser finds what matters: an import inside a function, a relative one."""
    pkg = tmp_path / "rlhf_lightning"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "ppo.py").write_text("def f():\n    from rlhf_lightning import evaluation\n")
    (pkg / "evaluation.py").write_text("from .models import ppo\n")
    known = {"rlhf_lightning", "rlhf_lightning.models", "rlhf_lightning.models.ppo", "rlhf_lightning.evaluation"}
    assert imports("rlhf_lightning.models.ppo", pkg / "models" / "ppo.py", known) == {"rlhf_lightning.evaluation": 2}
    assert imports("rlhf_lightning.evaluation", pkg / "evaluation.py", known) == {"rlhf_lightning.models.ppo": 1}


def test_models_never_import_evaluation_or_serving(graph):
    """The stage everything trains with stays below what judges and ships it."""
    leaks = [f"{name} imports {dep} (line {line})" for name, deps in graph.items() if name.startswith("rlhf_lightning.models")
             for dep, line in deps.items()
             if dep.startswith(("rlhf_lightning.evaluation", "rlhf_lightning.serving"))]
    assert not leaks, "\n".join(leaks)


def test_the_serving_side_holds_nothing_of_training(graph):
    """What ships (registry, the served model, deployments, inference checks, ...) loads without the
    training code: no models/, data/ or evaluation beyond the promotion rule (evaluation.gates, which
    imports nothing), so the served model's process and the deploy/inference steps stay light."""
    serving = [name for name in graph if name.startswith("rlhf_lightning.serving")]
    assert len(serving) >= 7
    leaks = [f"{name} imports {dep} (line {line})" for name in sorted(serving) for dep, line in graph[name].items()
             if dep in graph and layer(dep) in (1, 2, 3) and dep != "rlhf_lightning.evaluation.gates"]
    assert not leaks, "\n".join(leaks)
    assert not [d for d in graph["rlhf_lightning.evaluation.gates"] if d.startswith("rlhf_lightning.")]


def test_each_stage_package_says_what_it_is_for():
    for stage in ("data", "models", "evaluation", "serving"):
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) <= 3, stage


def test_the_flow_reaches_the_stages_only_through_the_pipeline():
    """flows/ (the Metaflow layer) calls `pipeline` and reads the shared modules; from a stage package it
    takes only error types, to tell an expected failure from a bug."""
    flows = PACKAGE.parent / "flows"
    reached = []
    for path in sorted(flows.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf_lightning"):
                for alias in node.names:
                    module = node.module if node.module != "rlhf_lightning" else f"rlhf_lightning.{alias.name}"
                    if module in SHARED or module == "rlhf_lightning.pipeline" or alias.name.endswith("Error"):
                        continue
                    reached.append(f"{path.name}:{node.lineno} {module}.{alias.name}")
    assert not reached, reached
