"""Nested structures the way ``tf.nest`` sees them, without TensorFlow.

Mappings are traversed in sorted key order, lists and tuples (namedtuples included) in order;
everything else (arrays, ``Sparse``, ``Ragged``, ``FeatureConfig``, ``None``) is a leaf. Paths are
the keys joined with ``/``, as ``tf.nest.flatten_with_joined_string_paths`` writes them: ``"0"``,
``"user"``, ``"ctx/item"``; a lone leaf has the path ``""``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _children(x: Any) -> list[tuple[str, Any]] | None:
    """The (key, child) pairs of a container in tf.nest order, or None for a leaf."""
    if isinstance(x, Mapping):
        return [(str(k), x[k]) for k in sorted(x)]
    if _is_namedtuple(x):
        return list(zip(type(x)._fields, x, strict=True))
    if isinstance(x, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(x)]
    return None


def flatten_with_paths(structure: Any) -> list[tuple[str, Any]]:
    """Returns ``[(path, leaf), ...]`` in ``tf.nest`` order.

    Example:
        >>> flatten_with_paths({"b": 1, "a": [2, (3,)]})
        [('a/0', 2), ('a/1/0', 3), ('b', 1)]
    """
    out: list[tuple[str, Any]] = []

    def walk(prefix: str, x: Any) -> None:
        children = _children(x)
        if children is None:
            out.append((prefix, x))
            return
        for key, child in children:
            walk(f"{prefix}/{key}" if prefix else key, child)

    walk("", structure)
    return out


def pack_like(structure: Any, leaves: list[Any]) -> Any:
    """Rebuilds ``structure`` with ``leaves`` in ``flatten_with_paths`` order."""
    it = iter(leaves)

    def build(x: Any) -> Any:
        if isinstance(x, Mapping):
            built = {k: build(x[k]) for k in sorted(x)}  # consume leaves in sorted-key order
            ordered = [(k, built[k]) for k in x]  # but keep the caller's key order
            return dict(ordered) if type(x) is dict else type(x)(ordered)  # type: ignore[call-arg]
        if _is_namedtuple(x):
            return type(x)(*(build(v) for v in x))
        if isinstance(x, (list, tuple)):
            return type(x)(build(v) for v in x)
        return next(it)

    return build(structure)


def structure_mismatch(a: Any, b: Any, path: str = "") -> str | None:
    """Describes the first place where ``a`` and ``b`` differ in nesting, or None if they match."""
    ca, cb = _children(a), _children(b)
    where = f"at {path!r}" if path else "at the top level"
    if ca is None and cb is None:
        return None
    if ca is None or cb is None or type(a) is not type(b):
        return f"{where}: {type(a).__name__} vs {type(b).__name__}"
    keys_a, keys_b = [k for k, _ in ca], [k for k, _ in cb]
    if keys_a != keys_b:
        return f"{where}: keys {keys_a} vs {keys_b}"
    for (key, va), (_, vb) in zip(ca, cb, strict=True):
        found = structure_mismatch(va, vb, f"{path}/{key}" if path else key)
        if found:
            return found
    return None


def from_json(node: dict, leaf: Callable[[dict], Any]) -> Any:
    """A nested structure from its JSON form: ``{"dict": {k: node}}``, ``{"list": [node]}``,
    ``{"tuple": [node]}`` or ``{"namedtuple": [fields], "values": [node]}``; any other node is a
    leaf, built by ``leaf(node)``. Checkpoints record feature configs and dense-model params so.

    Example:
        >>> from_json({"dict": {"a": {"tuple": [{"x": 1}, {"x": 2}]}}}, lambda n: n["x"])
        {'a': (1, 2)}
    """
    if "dict" in node:
        return {k: from_json(v, leaf) for k, v in node["dict"].items()}
    if "namedtuple" in node:
        cls = collections.namedtuple("Features", list(node["namedtuple"]))  # type: ignore[misc]
        return cls(*(from_json(v, leaf) for v in node["values"]))
    if "list" in node:
        return [from_json(v, leaf) for v in node["list"]]
    if "tuple" in node:
        return tuple(from_json(v, leaf) for v in node["tuple"])
    return leaf(node)
