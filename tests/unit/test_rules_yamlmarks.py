"""yamlmarks: values as PyYAML builds them, plus positions, duplicate keys and bounds."""

from __future__ import annotations

import datetime
import gc

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import yamlmarks
from gateway.core.yamlmarks import (
    MarkedList,
    MarkedMap,
    MarkedSafeLoader,
    Position,
    YamlSyntaxError,
    format_path,
    load_marked,
    paused_gc,
)

TEXT = """\
name: demo
items:
  - first
  - {key: 1, other: [true, null, 1.5]}
nested:
  deep:
    value: 2026-01-01
"""


@pytest.mark.parametrize("pure", [False, True], ids=["libyaml", "pure"])
def test_positions_of_keys_values_and_items(pure: bool) -> None:
    doc = load_marked(TEXT, pure=pure)
    root = doc.root
    assert isinstance(root, MarkedMap)
    assert root == {
        "name": "demo",
        "items": ["first", {"key": 1, "other": [True, None, 1.5]}],
        "nested": {"deep": {"value": datetime.date(2026, 1, 1)}},
    }
    assert doc.position == Position(1, 1)
    assert root.key_position("items") == Position(2, 1)
    assert root.value_position("name") == Position(1, 7)
    items = root["items"]
    assert isinstance(items, MarkedList)
    assert items.position == Position(3, 3)
    assert items.item_position(1) == Position(4, 5)
    assert items[1].value_position("other") == Position(4, 21)
    assert items[1]["other"].item_position(2) == Position(4, 34)
    assert root["nested"]["deep"].key_position("value") == Position(7, 5)
    assert doc.problems == ()


def test_duplicate_keys_are_problems_and_the_first_value_is_kept() -> None:
    doc = load_marked("a: 1\nb:\n  c: 1\n  c: 2\na: 3\n")
    assert doc.root == {"a": 1, "b": {"c": 1}}
    assert [(p.position, format_path(p.path), p.message) for p in doc.problems] == [
        (
            Position(4, 3),
            "b.c",
            "duplicate key 'c' (first at line 3, column 3); YAML would silently keep only the "
            "last one",
        ),
        (
            Position(5, 1),
            "a",
            "duplicate key 'a' (first at line 1, column 1); YAML would silently keep only the "
            "last one",
        ),
    ]


def test_unsupported_tags_complex_keys_and_merge_keys_are_problems() -> None:
    doc = load_marked("a: !custom 1\n? [x]\n: 2\nb:\n  <<: {c: 1}\n  d: !!binary aGk=\n")
    assert [(p.position, format_path(p.path)) for p in doc.problems] == [
        (Position(1, 4), "a"),
        (Position(2, 3), "(document)"),
        (Position(5, 3), "b"),
        (Position(6, 6), "b.d"),
    ]
    assert doc.root == {"a": "1", "b": {"d": "aGk="}}


def test_aliases_share_one_value() -> None:
    doc = load_marked("base: &b {x: 1}\nuse: *b\n")
    assert doc.root["use"] is doc.root["base"]


@pytest.mark.parametrize(
    ("text", "position", "problem"),
    [
        ("a: [1\n", Position(2, 1), "did not find expected ',' or ']'"),
        ("a: 1\n---\nb: 2\n", Position(2, 1), "but found another document"),
        ("a: b: c\n", Position(1, 5), "mapping values are not allowed"),
        ("x: &a [*a]\n", Position(1, 4), "an alias refers to the collection that contains it"),
        ("a: \x07\n", Position(1, 4), "character #x0007 is not allowed"),
    ],
)
def test_fatal_errors_carry_a_position(text: str, position: Position, problem: str) -> None:
    with pytest.raises(YamlSyntaxError) as info:
        load_marked(text)
    assert info.value.position == position
    assert problem in info.value.problem


def test_depth_is_bounded() -> None:
    text = "[" * (yamlmarks.MAX_DEPTH + 1) + "]" * (yamlmarks.MAX_DEPTH + 1)
    with pytest.raises(YamlSyntaxError, match="nested deeper than"):
        load_marked(text)
    ok = "[" * yamlmarks.MAX_DEPTH + "]" * yamlmarks.MAX_DEPTH
    assert load_marked(ok).root is not None


def test_alias_expansion_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A "billion laughs" in small: each level doubles the expanded size.
    lines = ["l0: &l0 [a, b]"]
    lines += [f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}]" for i in range(1, 12)]
    text = "\n".join(lines) + "\n"
    monkeypatch.setattr(yamlmarks, "MAX_EXPANDED_NODES", 5000)
    with pytest.raises(YamlSyntaxError, match="expands to more than 5000"):
        load_marked(text)
    monkeypatch.setattr(yamlmarks, "MAX_EXPANDED_NODES", 50_000)
    root = load_marked(text).root
    assert root["l11"][0] is root["l10"]


def test_empty_document_is_none() -> None:
    assert load_marked("").root is None
    assert load_marked("# only a comment\n").root is None


def test_usable_as_a_loader_class() -> None:
    assert yaml.load(TEXT, Loader=MarkedSafeLoader) == yaml.safe_load(TEXT)


def test_gc_pause_nests_and_restores() -> None:
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_format_path() -> None:
    assert format_path(()) == "(document)"
    assert format_path(("groups", "eng", "members", 2)) == "groups.eng.members[2]"


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=20),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(min_size=1, max_size=8).filter(str.isprintable), inner, max_size=4),
    ),
    max_leaves=20,
)


@given(VALUES, st.booleans())
def test_round_trip_matches_safe_load(value: object, flow: bool) -> None:
    text = yaml.safe_dump({"root": value}, default_flow_style=flow, allow_unicode=True)
    for pure in (False, True):
        doc = load_marked(text, pure=pure)
        assert doc.root == yaml.safe_load(text)
        assert doc.problems == ()


@given(VALUES)
def test_libyaml_and_pure_parser_give_the_same_positions(value: object) -> None:
    text = yaml.safe_dump({"root": value}, allow_unicode=True)

    def positions(node: object, out: list[Position]) -> list[Position]:
        if isinstance(node, MarkedMap):
            for key in node:
                out += [node.key_position(key), node.value_position(key)]
                positions(node[key], out)
        elif isinstance(node, MarkedList):
            for index, item in enumerate(node):
                out.append(node.item_position(index))
                positions(item, out)
        return out

    assert positions(load_marked(text).root, []) == positions(load_marked(text, pure=True).root, [])
