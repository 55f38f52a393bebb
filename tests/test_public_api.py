"""One public surface (issue 24 item 8): every module says what is API with `__all__`, the packages' documented
names are what they export, and the lazy exports are one helper that `help()` and tab completion see through."""

from __future__ import annotations

import importlib
import pydoc
import re

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
