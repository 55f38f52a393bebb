"""Which files cogsurgeon ever unpickles, and how (the README's Security section): read from the package's own
source, so a new `pickle.load` or a `torch.load` without `weights_only=True` fails here before it ships."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("inspector", "patches", "tools")


def calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def dotted(node: ast.AST) -> str:
    """`torch.load`, `MetadataUnpickler().load`, `reader.read_metadata`: what a call calls, as written."""
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return f"{dotted(node.func)}()"
    return node.id if isinstance(node, ast.Name) else "?"


def unpickles(name: str) -> bool:
    last = name.split(".")[-1]
    return name in ("pickle.load", "pickle.loads", "torch.load", "dill.load", "dill.loads", "joblib.load") \
        or last == "read_metadata" or (last in ("load", "loads") and "Unpickler" in name)


def unpickling_calls() -> list[tuple[str, int, str, ast.Call]]:
    found = []
    for folder in PACKAGE_FOLDERS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for call in calls(tree):
                name = dotted(call.func)
                if unpickles(name):
                    found.append((str(path.relative_to(REPO_ROOT)), call.lineno, name, call))
    return found


def test_every_torch_load_is_weights_only_and_nothing_else_unpickles():
    seen = set()
    for path, line, name, call in unpickling_calls():
        where = f"{path}:{line} {name}"
        if name == "torch.load":
            keywords = {k.arg: k.value for k in call.keywords}
            assert isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True, where
            seen.add((path, name))
        elif name == "MetadataUnpickler().load":
            assert path == "tools/lora/dcp.py", where
            seen.add((path, "MetadataUnpickler"))
        else:
            raise AssertionError(f"{where}: an unpickling call the Security section does not list")
    assert ("tools/lora/torch_pickle.py", "torch.load") in seen and ("tools/lora/dcp.py", "MetadataUnpickler") in seen, seen


def test_the_check_sees_an_unrestricted_load(tmp_path):
    """The check above can fail: the calls it looks for are found in code that has them."""
    code = ("pickle.load(f)\ntorch.load(p)\nreader.read_metadata()\nUnpickler(f).load()\n"
            "torch.distributed.checkpoint.FileSystemReader(p).read_metadata()\nlen(x)\n")
    names = [dotted(call.func) for call in calls(ast.parse(code)) if unpickles(dotted(call.func))]
    assert names == ["pickle.load", "torch.load", "reader.read_metadata", "Unpickler().load",
                     "torch.distributed.checkpoint.FileSystemReader().read_metadata"]
