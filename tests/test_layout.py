"""The module's layout, as its docstring promises it: sections in data-flow order, each using
only names defined in itself or above; short functions; one route table."""

from __future__ import annotations

import ast
import bisect
import functools
import re
from pathlib import Path

import jatos_lite

SOURCE = Path(jatos_lite.__file__).read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)


@functools.cache
def banners() -> list[tuple[int, str]]:
    """(first line, title) of each section: a title line between two lines of #."""
    lines = SOURCE.splitlines()
    return [(number + 1, lines[number][2:].strip()) for number in range(1, len(lines) - 1)
            if lines[number - 1].startswith("#####") and lines[number + 1].startswith("#####")
            and lines[number].startswith("# ")]


def section_of(line: int) -> int:
    """The index of the section holding `line` (-1 above the first banner)."""
    return bisect.bisect_right([start for start, _ in banners()], line) - 1


def top_level_names() -> dict[str, int]:
    defined: dict[str, int] = {}
    for node in TREE.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [target.id for target in node.targets if isinstance(target, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        for name in names:
            defined.setdefault(name, section_of(node.lineno))
    return defined


def test_no_section_uses_a_name_defined_below_it() -> None:
    defined, titles = top_level_names(), [title for _, title in banners()]
    backwards = sorted({(titles[section_of(node.lineno)], sub.id, titles[defined[sub.id]])
                        for node in TREE.body for sub in ast.walk(node)
                        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)
                        and defined.get(sub.id, -1) > section_of(node.lineno)})
    assert not backwards, f"(section, name, defined in): {backwards}"


def test_the_docstring_lists_the_sections_in_order() -> None:
    listed = re.search(r"cut into sections in data-flow order[^:]*:\s*(.*?)\.\n", jatos_lite.__doc__, re.S)
    assert listed, "the module docstring names its sections"
    names = [name.strip().lower() for name in listed.group(1).replace("\n", " ").split(",")]
    titles = [title.split(":")[0].strip().lower() for _, title in banners()]
    assert names == titles


def test_no_function_is_longer_than_60_lines() -> None:
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(TREE)
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60]
    assert not long


def test_every_route_is_found_by_grepping_its_path() -> None:
    for route in jatos_lite.ROUTES:
        assert f'"{route.path}"' in SOURCE, route.path


def test_the_api_routes_are_exactly_the_documented_ones() -> None:
    for route in jatos_lite.ROUTES:
        assert (route.doc is not None) == route.path.startswith(jatos_lite.API_PREFIX), route.path
        assert route.kind in ("plain", "publix", "api") and route.tx in ("write", "read", None)
    paths = jatos_lite.openapi_document()["paths"]
    documented = {(method, path) for path, entry in paths.items() for method in entry if method != "parameters"}
    routed = {(route.method.lower(), re.sub(r"<(\w+)(?::\w+)?>", r"{\1}", route.path))
              for route in jatos_lite.ROUTES if route.doc is not None}
    assert documented == routed


def test_no_top_level_name_is_defined_twice() -> None:
    """A second definition silently replaces the first for every caller above it too."""
    names = [node.name for node in TREE.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert sorted(name for name in set(names) if names.count(name) > 1) == []
