"""The module hierarchy as nested nodes, with runs of identical numbered blocks folded: the one fold and filter
of module rows behind both the TUI's tree (`visible_rows`) and the CLI's `modules` table (`listed_rows`).

Pure: built from the `ModuleInfo` list the inventory produced (parents are found by name), so it never touches
an `nn.Module` and is tested without Textual. Folding follows nnsight: 42 identical `CogVideoXBlock`s under
`transformer_blocks` read as `transformer_blocks (0-41): 42 × CogVideoXBlock` until expanded.
"""

from __future__ import annotations

from collections.abc import Iterator, Set
from dataclasses import dataclass, field, replace

from cogsurgeon.inspector.inventory import ModuleInfo, filter_inventory, matches


@dataclass(frozen=True)
class Fold:
    """A run of `repeat` numbered siblings `first..last` with identical subtrees, all of class `class_name`."""

    first: int
    last: int
    class_name: str

    @property
    def repeat(self) -> int:
        return self.last - self.first + 1

    @property
    def range_label(self) -> str:
        return f"({self.first}-{self.last})"

    def describe(self) -> str:
        return f"{self.range_label}: {self.repeat} × {self.class_name}"


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
            folded.append(ModuleNode(fold.range_label, None, run, fold, child.signature))
        else:
            folded.append(child)
        index = stop
    return folded


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


# --- the rows as drawn: the TUI's tree -------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeRow:
    """One row of the tree as drawn. `key` names the row by the labels on its path ("" for the root,
    "/transformer_blocks/3/attn1"), the same in a narrowed tree; `lasts` says, for each level below the root down
    to this row, whether the node there is the last of its siblings (what the guides draw)."""

    node: ModuleNode
    key: str
    lasts: tuple[bool, ...]
    expanded: bool

    @property
    def depth(self) -> int:
        return len(self.lasts)

    @property
    def expandable(self) -> bool:
        return bool(self.node.children)

    @property
    def module(self) -> ModuleInfo | None:
        """The module this row stands for: its own, or for a folded group row its first member's."""
        node: ModuleNode | None = self.node
        while node is not None and node.info is None:
            node = node.children[0] if node.children else None
        return node.info if node is not None else None


def child_key(parent_key: str, child: ModuleNode) -> str:
    return f"{parent_key}/{child.label}"


def visible_rows(root: ModuleNode, expanded: Set[str]) -> list[TreeRow]:
    """The rows a tree shows: `root`, then depth first the children of every row whose key is in `expanded`."""
    rows: list[TreeRow] = []
    stack: list[tuple[ModuleNode, str, tuple[bool, ...]]] = [(root, "", ())]
    while stack:
        node, key, lasts = stack.pop()
        is_open = key in expanded and bool(node.children)
        rows.append(TreeRow(node, key, lasts, is_open))
        if is_open:
            last_index = len(node.children) - 1
            for index in range(last_index, -1, -1):
                child = node.children[index]
                stack.append((child, child_key(key, child), (*lasts, index == last_index)))
    return rows


def keys_to(root: ModuleNode, name: str) -> list[str]:
    """The row keys from the root down to module `name` ([] when it is not in the tree)."""
    keys: list[str] = []
    for node in path_to(root, name):
        keys.append("" if not keys else child_key(keys[-1], node))
    return keys


def fold_for_filter(root: ModuleNode) -> ModuleNode:
    """A narrowed tree as `modules --filter` lists it: a folded run keeps only its first member (the others are
    identical, so they match alike), and its row still names the whole run: `transformer_blocks (0-41): 42 ×
    CogVideoXBlock`, then block 0's matches once, instead of 42 rows of blocks."""
    children = tuple(fold_for_filter(child) for child in root.children)
    if root.fold is not None and children:
        children = children[:1]
    return replace(root, children=children) if children != root.children else root


def opened_for_filter(root: ModuleNode) -> set[str]:
    """The rows to open in a tree narrowed by a filter, where every row is a match or leads to one: all of them,
    except that a folded run opens only through its first member, so its other members stay one row each."""
    opened: set[str] = set()

    def open_below(node: ModuleNode, key: str) -> None:
        opened.add(key)
        first_member_opened = False
        for child in node.children:
            if not child.children:
                continue
            if node.fold is not None:
                if first_member_opened:
                    continue
                first_member_opened = True
            open_below(child, child_key(key, child))

    open_below(root, "")
    return opened


# --- the rows as listed: the CLI's `modules` table ---------------------------------------------------------------


@dataclass(frozen=True)
class ListedRow:
    """A row of a flat listing: `info` stands for `repeat` identical modules; `display_name` writes the index
    range of a folded run, e.g. `transformer_blocks.(0-41).attn1`."""

    info: ModuleInfo
    display_name: str
    repeat: int = 1


def listed_rows(infos: list[ModuleInfo], filter_text: str | None = None, fold: bool = True) -> list[ListedRow]:
    """The `modules` table's rows: the modules matching `filter_text` (all when empty) in inventory order, each
    folded run of identical blocks listed once through its first member — the tree's fold, flattened."""
    if not fold:
        return [ListedRow(info, info.name) for info in filter_inventory(infos, filter_text)]
    narrowed, matched = narrow_inventory(infos, filter_text or "")
    shown = matched if (filter_text or "").strip() else None
    if not narrowed:
        return []
    rows: list[ListedRow] = []

    def walk(node: ModuleNode, display_name: str, repeat: int) -> None:
        if node.info is not None and (shown is None or node.info.name in shown):
            rows.append(ListedRow(node.info, display_name, repeat))
        if node.fold is not None:  # the run's first member stands for all of it, named by the index range
            walk(node.children[0], _join(display_name, node.fold.range_label), repeat * node.fold.repeat)
            return
        for child in node.children:  # a group row adds no name of its own: `blocks` + `(0-2)`
            walk(child, display_name if child.info is None else _join(display_name, child.label), repeat)

    root = build_module_tree(narrowed)
    walk(root, "", 1)
    return rows


def _join(prefix: str, label: str) -> str:
    return f"{prefix}.{label}" if prefix else label


__all__ = [
    "ListedRow", "ModuleNode", "TreeRow", "build_module_tree", "fold_for_filter", "keys_to", "listed_rows",
    "narrow_inventory", "opened_for_filter", "path_to", "visible_rows",
]
