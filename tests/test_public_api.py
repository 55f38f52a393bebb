"""One public surface (issue 24 item 8): every module says what is API with `__all__`, the packages' documented
names are what they export, and the lazy exports are one helper that `help()` and tab completion see through."""

from __future__ import annotations

import ast
import importlib
import inspect
import pydoc
import re
from pathlib import Path

import pytest

LAZY_PACKAGES = ["cogsurgeon.inspector", "cogsurgeon.patches", "cogsurgeon.tools.lora"]


@pytest.mark.parametrize("package_name", LAZY_PACKAGES)
def test_each_lazy_package_uses_the_one_helper_and_help_shows_its_real_entry_points(package_name):
    from cogsurgeon.inspector import lazy_exports

    package = importlib.import_module(package_name)
    for hook in (package.__getattr__, package.__dir__):
        assert hook.__module__ == lazy_exports.__name__, hook
    assert set(package._EXPORTS) <= set(dir(package))
    text = pydoc.render_doc(package, renderer=pydoc.plaintext)
    for name in package.__all__:
        value = getattr(package, name)
        if isinstance(value, type):
            assert re.search(rf"^    class {name}\b", text, re.M), name
        elif callable(value):
            assert re.search(rf"^    {name}\(", text, re.M), name
    with pytest.raises(AttributeError, match=f"module '{package_name}' has no attribute 'nonexistent'"):
        package.nonexistent  # noqa: B018


def test_a_lazy_export_is_its_module_s_own_object():
    from cogsurgeon import patches
    from cogsurgeon.inspector import load_transformer
    from cogsurgeon.inspector.loading import load_transformer as defined
    from cogsurgeon.patches.stream import streaming
    from cogsurgeon.tools import lora
    from cogsurgeon.tools.lora.merge import merge_loras

    assert load_transformer is defined and patches.streaming is streaming and lora.merge_loras is merge_loras


# ---------------------------------------------------------------- every module says what is API

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = {"inspector": "cogsurgeon.inspector", "patches": "cogsurgeon.patches",
                   "parallel": "cogsurgeon.parallel", "tools": "cogsurgeon.tools"}


def _module_files() -> dict[str, Path]:
    """Every module of the four packages by its import name (`__main__` runs the app and exports nothing)."""
    found = {}
    for folder, dotted in PACKAGE_FOLDERS.items():
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            if path.name == "__main__.py":
                continue
            parts = [part for part in path.relative_to(REPO_ROOT / folder).with_suffix("").parts if part != "__init__"]
            found[".".join([dotted, *parts])] = path
    return found


MODULES = _module_files()


def _top_level_bindings(tree: ast.Module) -> set[str]:
    """Names bound at a module's top level, inside `if` and `try` blocks too (an `if TYPE_CHECKING:` import is what
    a lazy export resolves to)."""
    names: set[str] = set()

    def bind(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.If):
                bind(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                bind(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])

    bind(tree.body)
    return names


def _declared_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(target, ast.Name) and target.id == "__all__" for target in targets):
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "sorted":  # sorted(_EXPORTS)
                exports = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                               and getattr(n.targets[0], "id", "") == "_EXPORTS")
                return sorted(ast.literal_eval(exports))
            return ast.literal_eval(value)
    return None


ALL_OF = {name: _declared_all(ast.parse(path.read_text())) for name, path in MODULES.items()}


@pytest.mark.parametrize("module_name", sorted(MODULES))
def test_every_module_says_what_is_api_and_every_name_it_exports_exists(module_name):
    tree = ast.parse(MODULES[module_name].read_text())
    exported = ALL_OF[module_name]
    assert exported is not None, f"{module_name} has no __all__: say which of its names are API"
    assert len(set(exported)) == len(exported), exported
    assert not [name for name in exported if name.startswith("_")], exported
    assert set(exported) <= _top_level_bindings(tree), set(exported) - _top_level_bindings(tree)


def _imported_names(text: str) -> list[tuple[str, str]]:
    """(module, name) of every `from cogsurgeon.X import name` in `text` that takes a name, not a submodule."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module in MODULES:
            found += [(node.module, alias.name) for alias in node.names
                      if f"{node.module}.{alias.name}" not in MODULES and alias.name != "*"]
    return found


def _readme_python() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO_ROOT / "README.md").read_text(), re.M | re.S)
    return "\n".join(blocks)


def test_what_one_module_takes_from_another_and_the_readme_imports_are_api():
    """A public name that another module of cogsurgeon (or the README) imports is API of the module it comes from:
    it is in that module's `__all__` (a helper shared inside a package keeps its leading underscore)."""
    sources = {str(path.relative_to(REPO_ROOT)): path.read_text() for path in MODULES.values()}
    sources["README.md"] = _readme_python()
    missing = sorted({f"{module}.{name} (imported by {where})" for where, text in sources.items()
                      for module, name in _imported_names(text)
                      if not name.startswith("_") and name not in (ALL_OF[module] or ())})
    assert missing == []


# ---------------------------------------------------------------- the packages export what they document

# A star import of `cogsurgeon.patches` stays free of torch (tests/test_patches_registry.py), so `streaming`, which
# imports torch, is documented and reached as `patches.streaming` but kept out of `__all__`.
KEPT_OUT_OF_STAR_IMPORT = {"cogsurgeon.patches": {"streaming"}}
PACKAGE_ALIASES = {"cogsurgeon.inspector": "inspector", "cogsurgeon.patches": "patches",
                   "cogsurgeon.parallel": "parallel", "cogsurgeon.tools.lora": "lora"}


def documented_names(package_name: str) -> set[str]:
    """The names the README's Python sections and the package's docstring use from the package: `from PACKAGE
    import a, b` and `alias.name(...)` in both, and each word of the docstring that names something cogsurgeon
    defines and the package holds (not a module, nor a name from outside cogsurgeon such as a diffusers class)."""
    package = importlib.import_module(package_name)
    alias = PACKAGE_ALIASES[package_name]
    readme, docstring = _readme_python(), package.__doc__ or ""
    names = {name for module, name in _imported_names(readme) if module == package_name}
    for text in (readme, docstring):
        names |= set(re.findall(rf"(?<![\w.]){alias}\.(\w+)", text))
    for name in set(re.findall(r"\w+", docstring)):
        value = getattr(package, name, None)
        if value is not None and not inspect.ismodule(value) and \
                getattr(value, "__module__", package_name).startswith("cogsurgeon."):
            names.add(name)
    return {name for name in names if f"{package_name}.{name}" not in MODULES}  # `patches.ulysses` is a module


@pytest.mark.parametrize("package_name", sorted(PACKAGE_ALIASES))
def test_each_package_exports_exactly_what_its_readme_and_docstring_document(package_name):
    package = importlib.import_module(package_name)
    kept_out = KEPT_OUT_OF_STAR_IMPORT.get(package_name, set())
    assert documented_names(package_name) - kept_out == set(package.__all__)
    for name in [*package.__all__, *kept_out]:
        assert getattr(package, name) is not None, name


# ---------------------------------------------------------------- lines a reader can see whole

MAX_LINE = 120  # characters, as an editor counts them (`·` and `…` are one each)


def test_no_line_of_the_packages_is_longer_than_120_characters():
    files = [path for folder in PACKAGE_FOLDERS for path in sorted((REPO_ROOT / folder).rglob("*.py"))]
    long_lines = [f"{path.relative_to(REPO_ROOT)}:{number}: {len(line)}" for path in files
                  for number, line in enumerate(path.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert long_lines == []
