"""The module hierarchy as nested nodes, with runs of identical numbered blocks folded, for the TUI's tree.

Pure: built from the `ModuleInfo` list the inventory produced (parents are found by name), so it never touches
an `nn.Module` and is tested without Textual. Folding follows nnsight: 42 identical `CogVideoXBlock`s under
`transformer_blocks` read as `transformer_blocks (0-41): 42 × CogVideoXBlock` until expanded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

from cogsurgeon.inspector.inventory import ModuleInfo


@dataclass(frozen=True)
class Fold:
    """A run of `repeat` numbered siblings `first..last` with identical subtrees, all of class `class_name`."""

    first: int
    last: int
    class_name: str

    @property
    def repeat(self) -> int:
        return self.last - self.first + 1

    def describe(self) -> str:
        return f"({self.first}-{self.last}): {self.repeat} × {self.class_name}"


@dataclass(frozen=True)
class ModuleNode:
    """One row of the tree. A module row has `info`; a group row (a folded run among siblings that are not all
    alike) has `info=None`, `label` "(0-9)" and the run's members as children. A module whose children are one
    folded run carries that `fold` itself: `transformer_blocks (0-41): 42 × CogVideoXBlock`."""

    label: str
    info: ModuleInfo | None
    children: tuple[ModuleNode, ...] = field(default=(), repr=False)
    fold: Fold | None = None
    signature: int = field(default=0, compare=False, repr=False)

    @property
    def name(self) -> str:
        """The module's dotted name; a group row answers with its first member's."""
        if self.info is not None:
            return self.info.name
        return self.children[0].name if self.children else ""

    def walk(self) -> Iterator[ModuleNode]:
        """This node and all below it, depth first, in inventory order."""
        yield self
        for child in self.children:
            yield from child.walk()


def _parent_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _leaf_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def build_module_tree(infos: list[ModuleInfo]) -> ModuleNode:
    """Nest `infos` (root first, as `module_inventory` returns them) by name and fold identical numbered runs.

    A module whose parent is absent from `infos` hangs from the nearest ancestor that is present, so a filtered
    list that kept ancestors (see `narrow_inventory`) nests the same way.
    """
    if not infos:
        raise ValueError("build_module_tree needs at least the root module")
    present = {info.name for info in infos}
    children_of: dict[str, list[ModuleInfo]] = {}
    for info in infos[1:] if infos[0].name == "" else infos:
        parent = _parent_name(info.name)
        while parent and parent not in present:
            parent = _parent_name(parent)
        children_of.setdefault(parent, []).append(info)
    root_info = infos[0] if infos[0].name == "" else None
    return _build_node(root_info, "", children_of)


def _build_node(info: ModuleInfo | None, name: str, children_of: dict[str, list[ModuleInfo]]) -> ModuleNode:
    children = [_build_node(child, child.name, children_of) for child in children_of.get(name, [])]
    folded = _fold_children(children)
    label = _leaf_name(name) if name else "(root)"
    fold = None
    if len(folded) == 1 and folded[0].info is None and folded[0].fold is not None:
        # every child belongs to one run: the parent row carries the fold and its members are its children
        fold = folded[0].fold
        folded = list(folded[0].children)
    own = (info.class_name, info.params, info.dtype, info.device, info.processor) if info else None
    signature = hash((own, tuple((child.label if not child.label.isdigit() else "#", child.signature)
                                 for child in children)))
    return ModuleNode(label, info, tuple(folded), fold, signature)


def _fold_children(children: list[ModuleNode]) -> list[ModuleNode]:
    """Replace each run of ≥2 consecutive numbered siblings with equal signatures by one group node."""
    folded: list[ModuleNode] = []
    index = 0
    while index < len(children):
        child = children[index]
        stop = index + 1
        if child.label.isdigit() and child.info is not None:
            while (
                stop < len(children)
                and children[stop].label.isdigit()
                and int(children[stop].label) == int(children[stop - 1].label) + 1
                and children[stop].signature == child.signature
            ):
                stop += 1
        if stop - index >= 2:
            run = tuple(children[index:stop])
            fold = Fold(int(run[0].label), int(run[-1].label), child.info.class_name)
            folded.append(ModuleNode(f"({fold.first}-{fold.last})", None, run, fold, child.signature))
        else:
            folded.append(child)
        index = stop
    return folded


@lru_cache(maxsize=8192)
def _haystack(info: ModuleInfo) -> str:
    # one lower-cased string per module, fields split by a character no filter contains, so that a keystroke
    # costs one `in` per module instead of five `lower()` calls
    fields = (info.name, info.class_name, info.class_module, info.file, info.processor)
    return "\0".join((value or "").lower() for value in fields)


def matches(info: ModuleInfo, needle: str) -> bool:
    """Whether the filter text (already lower-cased) occurs in the module's name, class, defining module, file
    or processor: the same fields as `filter_inventory`."""
    return needle in _haystack(info)


def narrow_inventory(infos: list[ModuleInfo], text: str) -> tuple[list[ModuleInfo], set[str]]:
    """The rows to show for a filter: every match plus its ancestors (so matches nest where they live), and the
    names of the matches. Empty text keeps everything and matches nothing."""
    needle = text.strip().lower()
    if not needle:
        return infos, set()
    matched = {info.name for info in infos if matches(info, needle)}
    keep = set(matched)
    for name in matched:
        while name:
            name = _parent_name(name)
            if name in keep:
                break
            keep.add(name)
    return [info for info in infos if info.name in keep], matched


def path_to(root: ModuleNode, name: str) -> list[ModuleNode]:
    """The nodes from `root` down to the module called `name` (group rows included); [] when it is not there."""
    if root.info is not None and root.info.name == name:
        return [root]
    for child in root.children:
        if child.info is not None and child.info.name != "" and not _is_within(name, child.info.name):
            continue
        found = path_to(child, name)
        if found:
            return [root, *found]
    return []


def _is_within(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(ancestor + ".")
