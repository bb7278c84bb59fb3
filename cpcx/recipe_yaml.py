"""Reading recipe YAML safely: a SafeLoader that refuses what ``yaml.safe_load`` would let through.

``yaml.safe_load`` never runs code, but a hostile or mistyped recipe can still hurt:

* **aliases that multiply** (the "billion laughs" recipe: nine anchors, each a list of nine aliases of the one
  before, is 9**9 nodes once expanded). PyYAML shares the aliased objects, so loading is cheap, but every
  later step (``${VAR}`` interpolation, overrides, pydantic) copies the tree and hangs while memory grows.
  We keep aliases, because sharing one block of settings (``device: &dev ...``) is legitimate, and bound the
  *expanded* size instead: the node graph is walked once with memoised sizes (linear time in the file), and
  a recipe whose expansion exceeds ``MAX_NODES`` is refused. A real recipe expands to a few hundred nodes.
* **an alias inside its own anchor** (``x: &x [*x]``) is a cycle: refused, with the line of the anchor.
* **deep nesting** (a list nested 3000 deep): PyYAML composes recursively and ends in RecursionError;
  the composer counts its depth and refuses past ``MAX_DEPTH`` (a recipe is at most ~5 levels deep).
* **duplicate keys**: YAML says they are an error, PyYAML keeps the last silently; we name the key and both
  lines.

Every refusal is a ``RecipeError`` with one line ``<source>: ...``.
"""
from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from cpcx.errors import RecipeError

MAX_DEPTH = 64
MAX_NODES = 100_000
MAX_BYTES = 256 << 10  # the paper's recipes are ~4 KB; pure-Python PyYAML takes ~4 s on 256 KiB of scalars
_MERGE_TAG = "tag:yaml.org,2002:merge"


#: what to do about the constructor's errors (their own text names the problem, not the fix)
_CONSTRUCT_HINTS = {
    "could not determine a constructor": "; a recipe holds plain values, remove the tag",
    "found unhashable key": "; a key must be a plain name, not a list or a mapping",
    "expected a mapping or list of mappings for merging": "; '<<' takes an alias of a mapping, e.g. <<: *base",
}


class _DepthError(yaml.YAMLError):
    def __init__(self, mark: Any):
        super().__init__("nested too deeply")
        self.mark = mark


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose composer stops at ``MAX_DEPTH`` levels instead of recursing until Python does."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _DepthError(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _key_text(node: Node) -> str:
    return str(node.value) if isinstance(node, ScalarNode) else f"<{node.id} on line {_line(node)}>"


def check_graph(root: Node, source: str) -> None:
    """Refuse cycles, expansions past ``MAX_NODES`` and duplicate keys; iterative, so no depth limit of its own.

    ``size`` memoises the expanded size of each node object (an alias is the same object again), so the walk
    is linear in the file even when the expansion is exponential.
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    # stack of (node, dotted path, its (child, path) list once entered, or None before)
    stack: list[tuple[Node, str, Any]] = [(root, "", None)]
    while stack:
        node, where, children = stack.pop()
        if children is None:
            if id(node) in size:
                continue
            if id(node) in on_path:
                raise RecipeError([f"{source}: {where or '(top level)'}: an alias to the anchor on line {_line(node)} "
                                   "sits inside that anchor (a cycle); replace the alias by the values it should hold"])
            on_path.add(id(node))
            if isinstance(node, MappingNode):
                _check_duplicates(node, where, source)
                kids = [(v, f"{where}.{_key_text(k)}" if where else _key_text(k)) for k, v in node.value]
                kids += [(k, where) for k, _ in node.value if not isinstance(k, ScalarNode)]
            elif isinstance(node, SequenceNode):
                kids = [(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(node.value)]
            else:
                kids = []
            stack.append((node, where, kids))
            stack.extend((child, path, None) for child, path in reversed(kids))
            continue
        on_path.discard(id(node))
        total = 1 + sum(size[id(child)] for child, _ in children)
        if total > MAX_NODES and len(size) >= MAX_NODES:  # that many distinct values, aliases or not
            raise RecipeError([f"{source}: {where or '(top level)'} (line {_line(node)}): holds more than "
                               f"{MAX_NODES:,} values, which no recipe does; pass the recipe YAML file"])
        if total > MAX_NODES:
            raise RecipeError([f"{source}: {where or '(top level)'} (line {_line(node)}): YAML aliases expand it to "
                               f"more than {MAX_NODES:,} values (an alias bomb?); write the values out or use fewer "
                               "aliases"])
        size[id(node)] = total


def _check_duplicates(node: MappingNode, where: str, source: str) -> None:
    first: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        if not isinstance(key, ScalarNode) or key.tag == _MERGE_TAG:
            continue  # '<<: *base' keys may legitimately be overridden by the mapping's own keys
        ident = (key.tag, key.value)  # `1:` (an int) and `"1":` (a string) are two keys
        if ident in first:
            dotted = f"{where}.{key.value}" if where else key.value
            raise RecipeError([f"{source}: {dotted}: duplicate key on lines {first[ident]} and {_line(key)}; "
                               "keep one of them (YAML does not allow a key twice)"])
        first[ident] = _line(key)


def load_yaml_text(text: str, source: str, syntax_errors: bool = True) -> Any:
    """Parse ``text`` with ``RecipeLoader`` and the graph checks; YAML errors become one ``RecipeError`` line.

    ``syntax_errors=False`` (override values) returns ``text`` itself when it is not valid YAML: ``name=a: b[``
    means that string. Depth, cycles, alias bombs and duplicate keys are refused either way.
    """
    try:
        loader = RecipeLoader(text)  # the reader rejects control characters (a NUL byte) right here
    except yaml.YAMLError as exc:
        if not syntax_errors:
            return text
        position = getattr(exc, "position", None)
        where = f"line {text.count(chr(10), 0, position) + 1}: " if isinstance(position, int) else ""
        raise RecipeError([f"{source}: {where}YAML syntax error: {str(exc).splitlines()[0]}; remove that "
                           "character"]) from None
    try:
        try:
            root = loader.get_single_node()
        except _DepthError as exc:
            where = f"line {exc.mark.line + 1}, column {exc.mark.column + 1}"
            raise RecipeError([f"{source}: {where}: nested more than {MAX_DEPTH} levels deep; a recipe is a few "
                               "levels of sections, check the brackets"]) from None
        except yaml.YAMLError as exc:
            if not syntax_errors:
                return text
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            if problem.startswith("but ") and getattr(exc, "context", None):  # "but found another document"
                problem = f"{exc.context} {problem}"
            raise RecipeError([f"{source}: {where}YAML syntax error: {problem}"]) from None
        if root is None:
            return None
        check_graph(root, source)
        try:
            return loader.construct_document(root)
        except yaml.YAMLError as exc:  # e.g. a merge key whose value is not a mapping
            if not syntax_errors:
                return text
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            hint = next((h for start, h in _CONSTRUCT_HINTS.items() if problem.startswith(start)), "")
            raise RecipeError([f"{source}: {where}YAML error: {problem}{hint}"]) from None
    finally:
        loader.dispose()
