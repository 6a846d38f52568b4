"""YAML that remembers where everything was written, and refuses to hide duplicate keys.

Admins edit the rules and ``gateway.yaml`` by hand, so every complaint about
them must point at a line and a column. PyYAML's constructor throws the
positions away and silently keeps the *last* of two equal keys. So we let
PyYAML (libyaml's C parser when it is installed) compose the document into its
node graph, whose nodes carry their start marks, and build the Python values
from that graph ourselves:

* a mapping becomes a :class:`MarkedMap` (a ``dict``) that can say where each
  of its keys and values starts; a sequence becomes a :class:`MarkedList` (a
  ``list``) that can say where each item starts. Positions are 1-based and are
  computed from the nodes only when asked, so a clean load allocates nothing
  per scalar beyond the value itself;
* a key written twice in one mapping is a :class:`Problem` (the first value
  is kept), as are tags we do not construct and merge keys (``<<``). Problems
  do not stop the load: the caller reports them with all its other findings;
* aliases share one value, as in PyYAML; the size of the document *after*
  alias expansion and its nesting depth are bounded, so a "billion laughs"
  file or a deeply nested one is refused instead of exhausting memory or the
  stack for whoever walks the result;
* cyclic garbage collection is paused while the node graph is built: the
  graph is hundreds of thousands of container objects that are all alive, and
  repeated collections over them made composing a large rules file five times
  slower.

Errors that stop the parse (bad syntax, several documents, recursion) raise
:class:`YamlSyntaxError`, a ``ValueError`` with the position; callers
translate it into their own error type.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_DEPTH = 64  # nesting of mappings and sequences
MAX_EXPANDED_NODES = 5_000_000  # nodes after alias expansion; a 100,000-member file has ~500,000

_TAG_PREFIX = "tag:yaml.org,2002:"
_STR_TAG = _TAG_PREFIX + "str"
_MAP_TAG = _TAG_PREFIX + "map"
_SEQ_TAG = _TAG_PREFIX + "seq"
_MERGE_TAG = _TAG_PREFIX + "merge"
_SCALAR_TAGS = frozenset(
    _TAG_PREFIX + name for name in ("str", "int", "float", "bool", "null", "timestamp")
)

PathPart = str | int  # a mapping key (as text) or a sequence index
KeyPath = tuple[PathPart, ...]
# While building, a path is a chain of (parent, part) pairs: one small tuple per
# level instead of a copy of the whole path for every value.
_Trail = tuple[Any, PathPart] | None


class Position(NamedTuple):
    """A place in the text: 1-based line and column. (A tuple: cheap to make by the 100,000.)"""

    line: int
    column: int

    @classmethod
    def of(cls, mark: yaml.Mark | None) -> Position:
        if mark is None:
            return cls(1, 1)
        return cls(mark.line + 1, mark.column + 1)

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


START = Position(1, 1)


def _node_position(node: Node) -> Position:
    return Position.of(node.start_mark)


class MarkedMap(dict[Any, Any]):
    """A mapping that knows where each of its keys and values was written."""

    __slots__ = ("_node", "_pairs")

    def __init__(self, node: MappingNode) -> None:
        super().__init__()
        self._node = node
        self._pairs: dict[Any, tuple[Node, Node]] = {}

    @property
    def position(self) -> Position:
        """Where the mapping starts (for a block mapping: its first key)."""
        return _node_position(self._node)

    def key_position(self, key: Any) -> Position:
        return _node_position(self._pairs[key][0])

    def value_position(self, key: Any) -> Position:
        return _node_position(self._pairs[key][1])


class MarkedList(list[Any]):
    """A sequence that knows where each of its items was written."""

    __slots__ = ("_node",)

    def __init__(self, node: SequenceNode) -> None:
        super().__init__()
        self._node = node

    @property
    def position(self) -> Position:
        return _node_position(self._node)

    def item_position(self, index: int) -> Position:
        return _node_position(self._node.value[index])


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong in the document that did not stop the load."""

    position: Position
    path: KeyPath
    message: str


@dataclass(frozen=True, slots=True)
class MarkedDocument:
    """The root value (``None`` for an empty document), where it starts, and the problems."""

    root: Any
    position: Position
    problems: tuple[Problem, ...]


class YamlSyntaxError(ValueError):
    """The text is not one YAML document we can build."""

    def __init__(self, problem: str, position: Position) -> None:
        super().__init__(f"{position}: {problem}")
        self.problem = problem
        self.position = position


def format_path(path: KeyPath) -> str:
    """``("groups", "eng", "members", 2)`` -> ``groups.eng.members[2]``."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        else:
            out.append(f".{part}" if out else part)
    return "".join(out) if out else "(document)"


# -- the pause of the cyclic collector -------------------------------------------
_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause cyclic GC while held; nests, and is safe when several threads load at once.

    For code that builds large graphs of objects that all stay alive (a
    document, its validation, the indexes compiled from it): hold it across
    all of that, so that the objects that survive are few when the collector
    resumes and looks at what was allocated meanwhile.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


# -- building values from the node graph ------------------------------------------
class _Builder:
    def __init__(self, constructor: yaml.constructor.SafeConstructor) -> None:
        self._constructor = constructor
        self._built: dict[int, tuple[Any, int]] = {}  # id(node) -> (value, expanded size)
        self._building: set[int] = set()
        self._count = 0
        self.problems: list[Problem] = []

    def build(self, node: Node, path: _Trail, depth: int) -> Any:
        if isinstance(node, ScalarNode):
            self._count += 1
            if node.tag == _STR_TAG:
                return node.value
            return self._scalar(node, path)
        key = id(node)
        done = self._built.get(key)
        if done is not None:  # an alias of a collection already built
            self._count += done[1]
            self._check_size(node)
            return done[0]
        if key in self._building:
            raise YamlSyntaxError(
                "an alias refers to the collection that contains it", _node_position(node)
            )
        if depth >= MAX_DEPTH:
            raise YamlSyntaxError(f"nested deeper than {MAX_DEPTH} levels", _node_position(node))
        self._building.add(key)
        before = self._count
        self._count += 1
        if isinstance(node, MappingNode):
            value: Any = self._mapping(node, path, depth + 1)
        elif isinstance(node, SequenceNode):
            value = self._sequence(node, path, depth + 1)
        else:  # pragma: no cover - the composer makes only these three kinds
            raise YamlSyntaxError(f"unexpected node {type(node).__name__}", _node_position(node))
        self._building.discard(key)
        self._built[key] = (value, self._count - before)
        self._check_size(node)
        return value

    def _check_size(self, node: Node) -> None:
        if self._count > MAX_EXPANDED_NODES:
            raise YamlSyntaxError(
                f"the document expands to more than {MAX_EXPANDED_NODES} values "
                "(aliases are counted at every use)",
                _node_position(node),
            )

    def _scalar(self, node: ScalarNode, path: _Trail) -> Any:
        if node.tag not in _SCALAR_TAGS:
            self._problem(node, path, f"the tag {node.tag} is not supported here; remove it")
            return node.value
        try:
            return self._constructor.yaml_constructors[node.tag](self._constructor, node)
        except (yaml.YAMLError, ValueError) as exc:
            self._problem(node, path, f"cannot read {node.value!r} as {node.tag}: {exc}")
            return node.value

    def _mapping(self, node: MappingNode, path: _Trail, depth: int) -> MarkedMap:
        if node.tag != _MAP_TAG:
            self._problem(node, path, f"the tag {node.tag} is not supported; write a plain mapping")
        result = MarkedMap(node)
        pairs = result._pairs
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self._problem(key_node, path, "a key must be a plain value, not a list or mapping")
                continue
            if key_node.tag == _MERGE_TAG:
                self._problem(
                    key_node, path, "merge keys (<<) are not supported; write the keys out"
                )
                continue
            if key_node.tag == _STR_TAG:
                self._count += 1
                key = key_node.value
            else:
                key = self.build(key_node, path, depth)
            if key in pairs:
                first = _node_position(pairs[key][0])
                self._problem(
                    key_node,
                    (path, str(key)),
                    f"duplicate key {key!r} (first at line {first.line}, column "
                    f"{first.column}); YAML would silently keep only the last one",
                )
                continue
            pairs[key] = (key_node, value_node)
            result[key] = self.build(value_node, (path, str(key)), depth)
        return result

    def _sequence(self, node: SequenceNode, path: _Trail, depth: int) -> MarkedList:
        if node.tag != _SEQ_TAG:
            self._problem(node, path, f"the tag {node.tag} is not supported; write a plain list")
        result = MarkedList(node)
        build = self.build
        scalar_str = _STR_TAG
        for index, item in enumerate(node.value):
            # Inline fast path: most items of a big file are plain strings (member names).
            if isinstance(item, ScalarNode) and item.tag == scalar_str:
                self._count += 1
                result.append(item.value)
            else:
                result.append(build(item, (path, index), depth))
        return result

    def _problem(self, node: Node, trail: _Trail, message: str) -> None:
        parts: list[PathPart] = []
        while trail is not None:
            trail, part = trail
            parts.append(part)
        self.problems.append(Problem(_node_position(node), tuple(reversed(parts)), message))


def _translate(exc: yaml.YAMLError, text: str) -> YamlSyntaxError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            problem = f"{exc.problem} ({exc.context})"
        return YamlSyntaxError(problem, Position.of(mark))
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        line = before.count("\n") + 1
        column = exc.position - (before.rfind("\n") + 1) + 1
        char = exc.character
        code = char if isinstance(char, int) else ord(char)
        return YamlSyntaxError(f"character #x{code:04x} is not allowed", Position(line, column))
    return YamlSyntaxError(str(exc), START)


def _build_document(loader: Any) -> MarkedDocument:
    """Compose with ``loader`` and build marked values; raises PyYAML's errors as they come."""
    with paused_gc():
        node = loader.get_single_node()
        if node is None:
            return MarkedDocument(None, START, ())
        builder = _Builder(loader)
        root = builder.build(node, None, 0)
    return MarkedDocument(root, _node_position(node), tuple(builder.problems))


class MarkedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose ``get_single_data`` builds marked values.

    ``yaml.load(text, Loader=MarkedSafeLoader)`` returns the root value and
    leaves the whole :class:`MarkedDocument` in ``marked_document``;
    :func:`load_marked` is the convenient way in.
    """

    marked_document: MarkedDocument | None = None

    def get_single_data(self) -> Any:
        self.marked_document = _build_document(self)
        return self.marked_document.root


_CSafeLoader: Any = getattr(yaml, "CSafeLoader", None)

if _CSafeLoader is not None and getattr(yaml, "__with_libyaml__", False):

    class MarkedCSafeLoader(_CSafeLoader):  # type: ignore[misc]
        """The same as :class:`MarkedSafeLoader` on libyaml's parser (several times faster)."""

        marked_document: MarkedDocument | None = None

        def get_single_data(self) -> Any:
            self.marked_document = _build_document(self)
            return self.marked_document.root

    _FAST_LOADER: type[Any] = MarkedCSafeLoader
else:  # pragma: no cover - libyaml is part of the supported install
    _FAST_LOADER = MarkedSafeLoader


def load_marked(text: str, *, pure: bool = False) -> MarkedDocument:
    """Parse one YAML document into marked values; ``YamlSyntaxError`` if impossible.

    ``pure=True`` uses PyYAML's Python parser even when libyaml is available
    (tests compare the two).
    """
    loader_class: type[Any] = MarkedSafeLoader if pure else _FAST_LOADER
    try:
        loader = loader_class(text)
        try:
            return _build_document(loader)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise _translate(exc, text) from exc
    except RecursionError as exc:
        raise YamlSyntaxError("the document is nested too deeply", START) from exc
