"""The package's shape (no import cycle between medlab's modules, at any depth: function-level imports count) and what importing it sets up."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medlab"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").exists() or (PACKAGE.parent / relative / "__init__.py").exists()


def import_graph() -> dict[str, set[str]]:
    """module -> the medlab modules it imports; ``from package import submodule`` counts as the submodule only."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.startswith("medlab")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medlab"):
                submodules = {f"{node.module}.{alias.name}" for alias in node.names}
                submodules = {module for module in submodules if _is_module(module)}
                imported |= submodules or {node.module}
        graph[name] = imported - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module], _ = "open", stack.append(module)
        for dependency in sorted(graph.get(module, ())):
            if state.get(dependency) == "open":
                return stack[stack.index(dependency):] + [dependency]
            if dependency not in state and (cycle := visit(dependency)):
                return cycle
        state[module], _ = "done", stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycle_inside_medlab():
    graph = import_graph()
    assert "medlab.data.folder" in graph and "medlab.data.types" in graph["medlab.data.folder"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_in_medlab_is_over_60_lines():
    """Long functions are split into named steps; a newcomer reads each in one screen."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_tensorflow_info_lines_are_dropped_unless_asked_for(monkeypatch):
    """TensorFlow's Python INFO lines go the way TF_CPP_MIN_LOG_LEVEL sends its C++ ones; warnings always pass."""
    import logging

    from medlab import TensorFlowInfoFilter

    assert any(isinstance(f, TensorFlowInfoFilter) for f in logging.getLogger("tensorflow").filters)

    def passes(level):
        return TensorFlowInfoFilter().filter(logging.LogRecord("tensorflow", level, __file__, 1, "x", None, None))

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    assert not passes(logging.INFO) and passes(logging.WARNING) and passes(logging.ERROR)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    assert passes(logging.INFO)


def test_keras_retracing_warnings_are_dropped_and_a_readers_own_are_kept():
    """Several models trained in one process: no 'please define your @tf.function outside of the loop' about Keras."""
    import logging

    import keras
    import numpy as np
    import tensorflow as tf

    import medlab  # noqa: F401  (installs the filter)

    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    collect = Collect()
    logger = logging.getLogger("tensorflow")
    logger.addHandler(collect)
    try:
        images, labels = np.zeros((8, 4), "float32"), np.zeros((8, 1), "float32")
        for _ in range(7):
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
            model.compile(loss="mse")
            model.fit(images, labels, epochs=1, verbose=0)
            model.predict(images, verbose=0)
        assert not [message for message in messages if "retracing" in message]
        for step in range(7):  # a reader's own tf.function, made again in a loop: TensorFlow's advice stands
            tf.function(lambda x: x + 1)(tf.constant(step))
        assert [message for message in messages if "retracing" in message and "lambda" in message]
    finally:
        logger.removeHandler(collect)
