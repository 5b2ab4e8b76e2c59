"""The structure rules the code must keep: no import cycle, the library never imports the demo assets, and only
formats.py spells the stored names of the W16A16S/W16A16SC formats."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "sparsezip"
# Names only formats.py may spell: the description keys and file names of the formats, and the suffixes of a
# compressed linear's stored tensors.
FORMAT_NAMES = {"model_quant_type", "quant_model_description.json", "quant_model_weight_w16a16sc.safetensors",
                "quant_model_weights", "W16A16S", "W16A16SC", "FLOAT"}
FORMAT_SUFFIXES = (".index", ".info", ".outdim")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module of `known` that `path` imports, at module level or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` needs only the submodule (an ancestor package is already importing); any other
            # name needs the module that defines it
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found |= submodules
            if len(submodules) < len(node.names) or not name.startswith(base + "."):
                found.add(base)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, set(known)) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_src():
    graph = import_graph()
    assert "sparsezip.codec" in graph["sparsezip.formats"]  # the parser sees imports at all
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_library_never_imports_the_demo_assets():
    graph = import_graph()
    importers = sorted(m for m, deps in graph.items() if m.startswith("sparsezip.") and
                       any(d.startswith("sparsezip_demo") for d in deps))
    assert importers == []


def test_kernels_reach_the_codec_only_from_the_gpu_coder():
    """The CPU kernels are called through sparsezip.codec, never the other way round."""
    graph = import_graph()
    cpu = [m for m in graph if m.startswith("sparsezip.kernels.cpu")]
    assert cpu and not any(d.startswith("sparsezip.codec") for m in cpu for d in graph[m])


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if p.name != "formats.py"),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_formats_spells_the_stored_names(path):
    spelled = [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)
               and (node.value in FORMAT_NAMES or node.value.endswith(FORMAT_SUFFIXES))]
    assert spelled == [], f"{path.name} spells format names; use sparsezip.formats"


def unsafe_loads(tree: ast.AST) -> list[str]:
    """Calls that can execute code from a model folder: pickle loading, torch.load, remote code switched on."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name in ("torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler", "torch.jit.load"):
            found.append(name)
        for keyword in node.keywords:
            if keyword.arg in ("trust_remote_code", "allow_pickle", "weights_only") and \
                    ast.unparse(keyword.value) != ("True" if keyword.arg == "weights_only" else "False"):
                found.append(f"{name}({keyword.arg}={ast.unparse(keyword.value)})")
    return found


def test_the_unsafe_load_finder_finds_them():
    code = "torch.load(f)\nAutoTokenizer.from_pretrained(d, trust_remote_code=True)\nnp.load(f, allow_pickle=True)"
    assert unsafe_loads(ast.parse(code)) == ["torch.load", "AutoTokenizer.from_pretrained(trust_remote_code=True)",
                                             "np.load(allow_pickle=True)"]


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_nothing_runs_code_from_a_model_folder(path):
    assert unsafe_loads(ast.parse(path.read_text(encoding="utf-8"))) == []
