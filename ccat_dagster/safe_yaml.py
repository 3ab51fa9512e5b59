"""The one YAML loader of ccat-dagster: PyYAML's SafeLoader with limits on size, expansion and nesting.

Every YAML the project reads (pipeline files, grouping rules files, the storage section of dagster.yaml) goes
through ``BoundedSafeLoader``, so unbounded input is refused before it costs anything:

- ``MAX_YAML_BYTES``: a larger file is refused after reading at most that many bytes (``read_limited_text``).
- ``MAX_YAML_NODES``: the size of the document with every alias expanded. An alias is a reference to an anchored
  node, so a few lines of nested aliases (a "billion laughs" bomb), also through merge keys
  (``<<: [*a, *a, ...]``), describe an exponentially large document. PyYAML composes and constructs an alias as
  a shared object (cheap), but everything that walks the result (the JSON check, schema validation, JSON
  encoding for ops-db and fingerprints) walks it expanded. The expanded size is counted while composing,
  bottom-up, one addition per node, and the document is refused as soon as it passes the limit, before it is
  constructed. A merged mapping counts in full each time (PyYAML merges each key once, so this overestimates
  what merges cost; real files merge a few small mappings).
- ``MAX_YAML_DEPTH``: nesting of collections; PyYAML composes recursively, so deeper input would otherwise end
  in a RecursionError instead of a message. An alias to a node that contains it (a recursive structure, which
  JSON cannot hold) is refused too.

PyYAML has no such limits of its own and no library adds them to it, hence this subclass (the counting uses
only the Composer's public ``compose_node`` hook). Real files stay far below the limits: the biggest example
pipeline has a few hundred nodes and nesting 6.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ccat_dagster.errors import CcatError

__all__ = [
    "MAX_YAML_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "BoundedSafeLoader",
    "YamlLimitError",
    "read_limited_text",
    "safe_load",
]

MAX_YAML_BYTES = 1_048_576
MAX_YAML_NODES = 50_000
MAX_YAML_DEPTH = 64


class YamlLimitError(CcatError, ValueError):
    """A YAML file beyond one of the loader's limits; the message names the file, the limit and the fix."""


def read_limited_text(path: Path, *, origin: str | None = None, max_bytes: int = MAX_YAML_BYTES) -> str:
    """The UTF-8 text of ``path``, reading at most ``max_bytes`` + 1 bytes; a larger file is YamlLimitError.

    OSError and UnicodeDecodeError reach the caller, which knows how to phrase them for its file.
    """
    with Path(path).open("rb") as stream:
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise YamlLimitError(
            f"{origin or path}: the file is larger than {max_bytes} bytes, the limit for YAML input: "
            "split it or remove what it does not need"
        )
    return data.decode("utf-8")


class BoundedSafeLoader(yaml.SafeLoader):
    """SafeLoader refusing documents beyond ``MAX_YAML_BYTES`` / ``MAX_YAML_NODES`` / ``MAX_YAML_DEPTH``.

    Subclass it like SafeLoader (constructors, resolvers); ``origin`` names the input in messages.
    """

    max_bytes = MAX_YAML_BYTES
    max_nodes = MAX_YAML_NODES
    max_depth = MAX_YAML_DEPTH

    def __init__(self, stream: str | bytes, *, origin: str = "<yaml>") -> None:
        if not isinstance(stream, str | bytes):
            raise TypeError("BoundedSafeLoader reads text or bytes; read files with read_limited_text")
        size = len(stream.encode("utf-8")) if isinstance(stream, str) else len(stream)
        if size > self.max_bytes:
            raise YamlLimitError(
                f"{origin}: the YAML text is larger than {self.max_bytes} bytes, the limit for YAML input: "
                "split it or remove what it does not need"
            )
        super().__init__(stream)
        self.origin = origin
        self._expanded_size: dict[int, int] = {}  # id(node) → nodes it stands for, its aliases expanded
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._expanded_size:
                raise YamlLimitError(
                    f"{self._where(event)}: alias *{event.anchor} refers to a node that contains it: a recursive "
                    "structure cannot be stored; write the value out"
                )
            node = super().compose_node(parent, index)  # the anchored node itself: its size is known
            self._check_size(self._expanded_size[id(node)], event)
            return node
        event = self.peek_event()
        self._depth += 1
        if self._depth > self.max_depth:
            raise YamlLimitError(
                f"{self._where(event)}: collections nested deeper than {self.max_depth} levels, the limit for "
                "YAML input: flatten the structure"
            )
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._expanded_size[id(child)] for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._expanded_size[id(k)] + self._expanded_size[id(v)] for k, v in node.value)
        self._expanded_size[id(node)] = size
        self._check_size(size, event)
        return node

    def _check_size(self, size: int, event: yaml.Event) -> None:
        if size > self.max_nodes:
            raise YamlLimitError(
                f"{self._where(event)}: the document expands to more than {self.max_nodes} nodes with its "
                "aliases (*name, << merges) written out, the limit for YAML input: use fewer aliases or a "
                "smaller file"
            )

    def _where(self, event: yaml.Event) -> str:
        mark = event.start_mark
        return f"{self.origin}:{mark.line + 1}" if mark is not None else self.origin


def safe_load(text: str | bytes, *, origin: str = "<yaml>") -> Any:
    """``yaml.safe_load`` within the limits: one document, or None for an empty one.

    Raises YamlLimitError beyond a limit and yaml.YAMLError for invalid YAML.
    """
    loader = BoundedSafeLoader(text, origin=origin)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
