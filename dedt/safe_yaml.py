"""YAML from users (pipelines files, ``--set`` values, deployment parameters) is untrusted input.

``yaml.safe_load`` builds no Python objects, but aliases still let a few hundred bytes stand for
billions of values (each level of ``&a [*b, *b, ...]`` multiplies), and an alias inside its own
anchor builds a recursive list that ends in a RecursionError far from the file. ``load_yaml``
refuses both before constructing anything, and ``read_yaml_text`` refuses files that are not
small regular files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dedt.errors import DedtError

MAX_YAML_BYTES = 1 << 20  # pipelines.yaml is a few KB
MAX_YAML_VALUES = 100_000  # scalars, lists and mappings once every alias is expanded


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses an alias to a node still being composed (a recursive alias)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._open_anchors: set[str] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"alias *{event.anchor} refers to a value that contains it (a recursive alias)",
                    event.start_mark,
                )
            return super().compose_node(parent, index)
        anchor = event.anchor
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open_anchors.discard(anchor)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values ``node`` stands for with every alias written out (shared nodes counted once each time)."""
    if id(node) not in sizes:
        if isinstance(node, yaml.ScalarNode):
            size = 1
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
        else:
            size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
        sizes[id(node)] = size
    return sizes[id(node)]


def load_yaml(text: str, where: str) -> Any:
    """Plain YAML values from ``text``: refuses a recursive alias, more than MAX_YAML_VALUES values after
    alias expansion and nesting too deep to parse; PyYAML's own errors (a ``!!python`` tag, bad syntax)
    pass through as ``yaml.YAMLError`` for the caller to place."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise DedtError(
                f"{where}: its aliases expand to more than {MAX_YAML_VALUES:,} values; write the values "
                "out or use fewer aliases"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise DedtError(f"{where}: nested too deeply to read; flatten it") from None
    finally:
        loader.dispose()


def read_yaml_text(path: Path) -> str:
    """The text of a YAML file that must be a regular file of at most MAX_YAML_BYTES (a FIFO would hang)."""
    path = Path(path)
    if not path.is_file():
        raise DedtError(f"{path} is not a regular file; pass --pipelines FILE")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise DedtError(f"{path} is larger than {MAX_YAML_BYTES >> 20} MiB; a pipelines file holds a few KB of YAML")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DedtError(f"cannot read {path} as UTF-8 text ({exc}); fix the file") from exc
