"""Package layering of `wenet_moe`, read from the source with `ast` (every import
statement, including those inside functions, counts):

- the model and its layers never import the trainer (`wenet_moe.train`), the commands
  (`wenet_moe.bin`, `wenet_moe.cli`) or the exporter (`wenet_moe.export`);
- layers import only layers and `wenet_moe.config`;
- checkpoint reading (`wenet_moe.checkpoint_io`) sits below both model and trainer;
- no import cycle among `wenet_moe` modules.
"""
import ast
import os
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_ours(name: str) -> bool:
    return name == "wenet_moe" or name.startswith("wenet_moe.")


def _modules() -> Dict[str, str]:
    """Module name -> source path of every module of the package."""
    found = {}
    for directory, _, files in os.walk(os.path.join(ROOT, "wenet_moe")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
    return found


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the `wenet_moe` modules it imports (`from pkg import sub` names the
    submodule when it is one, else the package)."""
    modules = _modules()

    def resolve(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: Dict[str, Set[str]] = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names if _is_ours(a.name))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if not _is_ours(base):
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in modules else resolve(base))
        deps.discard(module)
        graph[module] = deps
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_model_and_layers_do_not_import_trainer_commands_or_export():
    graph = import_graph()
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if _under(m, "wenet_moe.model", "wenet_moe.layers")
                 for d in deps if _under(d, "wenet_moe.train", "wenet_moe.bin", "wenet_moe.cli",
                                         "wenet_moe.export"))
    assert not bad, bad


def test_layers_import_only_layers_and_config():
    graph = import_graph()
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if _under(m, "wenet_moe.layers")
                 for d in deps if not _under(d, "wenet_moe.layers", "wenet_moe.config"))
    assert not bad, bad


def test_checkpoint_reading_sits_below_model_and_trainer():
    graph = import_graph()
    assert graph["wenet_moe.checkpoint_io"] <= {"wenet_moe.config"}
    assert "wenet_moe.checkpoint_io" in graph["wenet_moe.model.loading"]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_cycle_finder_finds_a_known_cycle():
    """The checker itself: a planted two-module cycle and a three-module one are found,
    an acyclic chain is not."""
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": set(), "x": {"y"}, "y": {"z"}, "z": {"x"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["x", "y", "z"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
