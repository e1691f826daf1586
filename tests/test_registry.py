"""Registry and plugin discovery: decorators, duplicates, did-you-mean, broken plugins, entry-point laziness."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from mtbench import registry
from mtbench.errors import MtbenchError
from mtbench.registry import Registry, RegistryError, UnknownNameError


def test_builtins_are_discovered() -> None:
    assert {"full_ft", "lora"} <= set(registry.methods.names())
    assert "glue" in registry.tasks.names()
    assert {"tiny_bert", "minilm_l6"} <= set(registry.backbones.names())
    assert registry.methods.origin("lora").startswith("built-in methods/lora.py:")


def test_unknown_name_has_did_you_mean_and_choices() -> None:
    with pytest.raises(UnknownNameError) as info:
        registry.methods.get("lorra")
    message = str(info.value)
    assert "did you mean 'lora'?" in message
    assert "full_ft" in message and "available:" in message


def test_duplicate_names_raise() -> None:
    reg: Registry[object] = Registry("thing")
    reg.add("a", object(), "here")
    with pytest.raises(RegistryError, match="duplicate thing name 'a'"):
        reg.add("a", object(), "there")


def test_names_must_be_snake_case() -> None:
    reg: Registry[object] = Registry("thing")
    with pytest.raises(RegistryError, match="lowercase snake_case"):
        reg.add("LoRA", object(), "here")


def test_interface_check_rejects_non_methods() -> None:
    with pytest.raises(RegistryError, match="breaks the interface"):
        registry.methods.add("not_a_method", object(), "test")
    assert "not_a_method" not in registry.methods


def _plugin(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_plugin_with_syntax_error_names_file(tmp_path: Path) -> None:
    path = _plugin(tmp_path, "broken", "def oops(:\n")
    with pytest.raises(RegistryError, match=r"broken\.py failed to import \(SyntaxError at line 1"):
        registry.load_plugin_file(path)


def test_plugin_registering_duplicate_is_error(tmp_path: Path) -> None:
    path = _plugin(tmp_path, "dup", """
        from mtbench import register_method
        from mtbench.methods.full_ft import FullFineTuning

        @register_method("lora")
        class Again(FullFineTuning):
            pass
    """)
    with pytest.raises(RegistryError, match="duplicate method name 'lora'"):
        registry.load_plugin_file(path)


def test_plugin_breaking_interface_is_error(tmp_path: Path) -> None:
    path = _plugin(tmp_path, "half", """
        from mtbench import Method, register_method

        @register_method("half_done")
        class HalfDone(Method):
            pass
    """)
    with pytest.raises(RegistryError, match="does not implement apply"):
        registry.load_plugin_file(path)
    assert "half_done" not in registry.methods


def test_missing_plugin_file(tmp_path: Path) -> None:
    with pytest.raises(MtbenchError, match="does not exist"):
        registry.load_plugin_file(tmp_path / "nope.py")


def test_lazy_entry_point_fails_only_when_selected() -> None:
    from importlib.metadata import EntryPoint

    reg: Registry[object] = Registry("thing")
    reg.add_lazy("ext", EntryPoint("ext", "no_such_module_xyz:Thing", "mtbench.methods"))
    assert "ext" in reg.names()
    with pytest.raises(RegistryError, match="failed to import"):
        reg.get("ext")


def test_dependency_rule_methods_and_tasks_do_not_import_each_other() -> None:
    """Methods never import tasks and tasks never import methods (read with ast, not by importing)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    for folder, forbidden in (("methods", "tasks"), ("tasks", "methods")):
        for file in (root / folder).glob("*.py"):
            tree = ast.parse(file.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                for name in names:
                    assert not name.startswith((f"mtbench.{forbidden}", forbidden)), f"{file.name} imports {name}"


def _import_graph() -> dict[str, set[str]]:
    """mtbench module -> the mtbench modules it imports anywhere in its source (top level, functions and
    ``TYPE_CHECKING`` blocks alike), read with ast."""
    import ast

    root = Path(__file__).resolve().parents[1]
    files = {}
    for folder, package in (("mtbench", "mtbench"), ("methods", "mtbench.methods"), ("tasks", "mtbench.tasks")):
        for file in (root / folder).glob("*.py"):
            name = package if file.stem == "__init__" else f"{package}.{file.stem}"
            files[name] = file
    graph: dict[str, set[str]] = {}
    for name, file in files.items():
        package = name if file.stem == "__init__" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_import_graph_of_the_package_has_no_circle() -> None:
    """Each module of mtbench/ (with the built-in methods and tasks) depends one way: no import circle."""
    graph = _import_graph()
    assert {"mtbench.registry", "mtbench.backbones", "mtbench.leaderboard", "mtbench.render"} <= set(graph)
    assert "mtbench.interfaces" in graph["mtbench.registry"]  # the walker sees function-level imports
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                circle = path[path.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "mtbench.backbones" not in graph["mtbench.registry"]
    assert "mtbench.render" not in graph["mtbench.leaderboard"]


def test_each_registry_imports_only_its_own_builtins() -> None:
    """Reading the method registry imports the method modules and not the tasks; importing the registry imports no
    backbone module (the registry names its built-ins, it does not import them)."""
    import subprocess
    import sys

    code = ("import sys\nfrom mtbench import registry\n"
            "assert 'mtbench.backbones' not in sys.modules and 'torch' not in sys.modules\n"
            "names = registry.methods.names()\n"
            "assert 'lora' in names and 'mtbench.methods.lora' in sys.modules\n"
            "tasks = [m for m in sys.modules if m.startswith('mtbench.tasks.')]\n"
            "assert not tasks, tasks\n"
            "assert 'glue' in registry.tasks.names() and 'mtbench.tasks.glue' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MTBENCH_DISABLE_PLUGIN_AUTOLOAD": "1", "MTBENCH_PLUGINS": ""})
    assert done.returncode == 0, done.stderr[-1500:]
