"""Deterministic single-site mutations of a correct Python solution into plausible incorrect ones.

Each mutant changes one AST node (a comparison or arithmetic operator, an integer constant by one,
True/False, ``and``/``or``, a ``not``, a ``return`` value, a slice bound) and is written back by
replacing only that node's source span with ``ast.unparse`` of the mutated node, so the rest of the
program keeps its original formatting: correct and incorrect rows must not be told apart by style.
A mutant is kept only if re-parsing it gives exactly the mutated tree.
"""

from __future__ import annotations

import ast
import copy
import random
from collections.abc import Callable, Iterator

_COMPARE_SWAPS: dict[type, type] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_ARITH_SWAPS: dict[type, type] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.FloorDiv: ast.Mult,
    ast.Div: ast.FloorDiv,
    ast.Mod: ast.FloorDiv,
}
_BOOL_SWAPS: dict[type, type] = {ast.And: ast.Or, ast.Or: ast.And}

Mutation = Callable[[ast.AST], ast.AST]
"""Takes a private copy of a node and returns its replacement."""


def _set(field: str, value: object) -> Mutation:
    def apply(node: ast.AST) -> ast.AST:
        setattr(node, field, value)
        return node

    return apply


def _int_literal(value: int) -> Mutation:
    # A negative literal is parsed as unary minus on a positive constant; build it that way so the
    # mutant round-trips (0 -> -1 is a common off-by-one).
    node = ast.Constant(value) if value >= 0 else ast.UnaryOp(ast.USub(), ast.Constant(-value))
    return lambda _: node


def _swap_compare_op(i: int) -> Mutation:
    def apply(node: ast.AST) -> ast.AST:
        assert isinstance(node, ast.Compare)
        node.ops[i] = _COMPARE_SWAPS[type(node.ops[i])]()
        return node

    return apply


def _mutations(node: ast.AST) -> list[Mutation]:
    """Every single mutation applicable to ``node`` itself, in a fixed order."""
    if isinstance(node, ast.Compare):
        return [_swap_compare_op(i) for i, op in enumerate(node.ops) if type(op) in _COMPARE_SWAPS]
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _ARITH_SWAPS:
        return [_set("op", _ARITH_SWAPS[type(node.op)]())]
    if isinstance(node, ast.BoolOp):
        return [_set("op", _BOOL_SWAPS[type(node.op)]())]
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool):
            return [_set("value", not node.value)]
        if isinstance(node.value, int):
            return [_int_literal(node.value + 1), _int_literal(node.value - 1)]
        return []
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return [lambda n: n.operand]  # type: ignore[attr-defined]
    if isinstance(node, ast.Return) and node.value is not None:
        if isinstance(node.value, ast.Constant) and node.value.value is None:
            return []
        return [_set("value", ast.Constant(None))]
    if isinstance(node, ast.Slice):
        return [_set(bound, None) for bound in ("lower", "upper", "step") if getattr(node, bound)]
    return []


def _replace_child(parent: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for field, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, field, new)
            return
        if isinstance(value, list):
            for i, item in enumerate(value):
                if item is old:
                    value[i] = new
                    return
    raise ValueError("node is not a child of parent")


def _splice(source: bytes, line_starts: list[int], node: ast.AST) -> str:
    """``source`` with ``node``'s span (byte offsets, as ast reports them) replaced by its unparse."""
    start = line_starts[node.lineno - 1] + node.col_offset  # type: ignore[attr-defined]
    end = line_starts[node.end_lineno - 1] + node.end_col_offset  # type: ignore[attr-defined]
    return (source[:start] + ast.unparse(node).encode() + source[end:]).decode()


def _apply(code: str, index: int, variant: int) -> str | None:
    """Source of ``code`` with mutation ``variant`` of the ``index``-th node (ast.walk order), or
    None when no span up to the enclosing statement re-parses to exactly the mutated tree."""
    tree = ast.parse(code)
    nodes = list(ast.walk(tree))
    parents = {child: parent for parent in nodes for child in ast.iter_child_nodes(parent)}
    target = nodes[index]
    replacement = ast.copy_location(_mutations(target)[variant](copy.deepcopy(target)), target)
    _replace_child(parents[target], target, replacement)
    expected = ast.dump(tree)

    source = code.encode()
    line_starts = [0]
    for line in source.split(b"\n")[:-1]:
        line_starts.append(line_starts[-1] + len(line) + 1)
    # Widen the rewritten span only as far as the statement, so the mutant's style stays local;
    # a narrower span can fail to round-trip (precedence, f-string positions before Python 3.12).
    spans = [replacement]
    node = target
    while not isinstance(node, ast.stmt) and node in parents:
        node = parents[node]
        spans.append(node)
    for node in spans:
        if not hasattr(node, "lineno"):
            continue
        candidate = _splice(source, line_starts, node)
        try:
            if ast.dump(ast.parse(candidate)) == expected:
                return candidate
        except SyntaxError:
            continue
    return None


def _sites(tree: ast.Module) -> Iterator[tuple[int, int]]:
    for index, node in enumerate(ast.walk(tree)):
        for variant in range(len(_mutations(node))):
            yield index, variant


def mutants(code: str, *, seed: int, limit: int) -> list[str]:
    """Up to ``limit`` distinct single-site mutants of ``code`` (all different from it), in an order
    fixed by ``seed``. Line endings are normalised to "\\n"; unparsable code has no mutants."""
    code = code.replace("\r\n", "\n").replace("\r", "\n")
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    sites = list(_sites(tree))
    random.Random(seed).shuffle(sites)
    seen = {ast.dump(tree)}
    found: list[str] = []
    for index, variant in sites:
        if len(found) >= limit:
            break
        mutant = _apply(code, index, variant)
        if mutant is None:
            continue
        key = ast.dump(ast.parse(mutant))
        if key not in seen:
            seen.add(key)
            found.append(mutant)
    return found
