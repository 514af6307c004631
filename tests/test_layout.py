"""The package's shape, read from its source: imports run one way (no module reaches itself
again through its imports, lazy ones included) and no module imports another's private name."""

from __future__ import annotations

import ast
from pathlib import Path

import tuneloop

SRC = Path(tuneloop.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = ("tuneloop", *path.relative_to(SRC).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict) -> list[tuple[str, str]]:
    """(module imported, name taken from it or "") for every import in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                if f"{base}.{a.name}" in known:
                    found.append((f"{base}.{a.name}", ""))
                elif base in known:
                    found.append((base, a.name))
    return [(m, n) for m, n in found if m != name]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_and_no_private_names_across_modules():
    known = modules()
    assert {"tuneloop.cli", "tuneloop.train.sft", "tuneloop.serve.app"} <= set(known)
    edges = {name: imports(name, path, known) for name, path in known.items()}
    graph = {name: {m for m, _ in found} for name, found in edges.items()}
    assert circles(graph) == []
    private = [f"{name} imports {n} from {m}" for name, found in edges.items()
               for m, n in found if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_layout_page_names_what_the_code_holds():
    """docs/layout.md: each registry it points to is defined where it says, each file it names
    exists, and every folder and top-level module of the package is in its file list."""
    import re

    page = (SRC.parents[1] / "docs" / "layout.md").read_text()
    pointers = re.findall(r"`(\w+(?:\.\w+)?)` in `([\w/]+\.py)`", page)
    assert len(pointers) >= 5
    for name, file in pointers:
        path = SRC / file
        assert path.is_file(), file
        tree = ast.parse(path.read_text())
        top, _, attr = name.partition(".")
        defined = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                   for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                   if isinstance(t, ast.Name)}
        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        if attr:
            assert top in classes and attr in {f.name for f in classes[top].body
                                               if isinstance(f, ast.FunctionDef)}, name
        else:
            assert top in defined or top in classes, f"{name} in {file}"
    for file in re.findall(r"`((?:\w+/)+\w+\.py)`", page):
        assert (SRC / file).is_file() or (SRC.parents[1] / file).is_file(), file
    files = page[page.index("## Files"):]
    for entry in SRC.iterdir():
        if entry.name.startswith("__") or entry.suffix not in ("", ".py"):
            continue
        if entry.is_dir() and not (entry / "__init__.py").is_file():
            continue
        label = entry.name + ("/" if entry.is_dir() else "")
        assert re.search(rf"^\s+{re.escape(label)}\s", files, re.M), f"{label} not in docs/layout.md"


# The stages and the layers below them, lowest first: a module may import only what sits at
# or below its own place (docs/layout.md, "Where a new part plugs in").
ORDER = ["errors", "core", "store", "models", "tasks", "methods", "project", "terminal",
         "data", "synth", "evaluate", "baselines", "train", "serve", "demo", "cli"]
# Names of methods and task kinds, as dispatch by string would spell them.
DISPATCHED = {"lora", "qlora", "dora", "full", "dpo", "distill", "classify", "extract", "chat"}


def top_level_imports() -> dict[str, set[tuple[str, str]]]:
    """{top-level folder or module: {(the one it imports, where)}} over the package."""
    tops = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
            if not p.name.startswith("__") and (p.suffix == ".py" or p.is_dir())}
    out: dict[str, set] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        me = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if me == "__init__":  # the package's lazy public API sits above everything
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tuneloop"):
                parts = node.module.split(".")
                found = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name.split(".")[1] for a in node.names
                         if a.name.startswith("tuneloop.")]
            else:
                continue
            out.setdefault(me, set()).update((t, f"{rel}:{node.lineno}") for t in found
                                             if t in tops and t != me)
    return out


def test_stages_import_only_what_sits_below_them():
    imports = top_level_imports()
    assert set(imports) <= set(ORDER), set(imports) - set(ORDER)
    pairs = sorted({tuple(sorted((a, b))) for a, found in imports.items() for b, _ in found
                    if a in {t for t, _ in imports.get(b, ())}})
    assert pairs == []
    upward = [f"{a} imports {b} ({where})" for a, found in imports.items()
              for b, where in found if ORDER.index(b) > ORDER.index(a)]
    assert upward == []


def dispatch_by_name(tree) -> list[str]:
    """Comparisons of a name or attribute called method, kind, task or type with a string
    (or a tuple of strings) naming a method or a task kind."""
    def name(n):
        return n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else None

    def strings(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            return {n.value}
        if isinstance(n, (ast.Tuple, ast.List, ast.Set)):
            return {e.value for e in n.elts if isinstance(e, ast.Constant)}
        return set()

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if (any(name(s) in ("method", "kind", "task", "type") for s in sides)
                    and any(strings(s) & DISPATCHED for s in sides)):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_methods_and_tasks_are_asked_not_compared_by_name():
    """Callers look a method or a task up in its registry; what is left compares a row's
    format while it is read (core/formats.py, data/curate.py)."""
    found = {str(p.relative_to(SRC)): hits for p in SRC.rglob("*.py")
             if (hits := dispatch_by_name(ast.parse(p.read_text())))}
    assert sum(map(len, found.values())) <= 20, found
    assert set(found) <= {"core/formats.py", "data/curate.py"}, found


def test_the_dispatch_counter_finds_dispatch():
    tree = ast.parse("if recipe.method == 'dpo': pass\nif kind in ('classify', 'chat'): pass\n"
                     "if mode == 'dpo': pass\nif recipe.method == methods.DPO: pass")
    assert len(dispatch_by_name(tree)) == 2


def test_no_function_is_over_a_hundred_lines():
    long = [f"{p.relative_to(SRC)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in SRC.rglob("*.py") if p.name != "migrations.py"
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 100]
    assert long == []
