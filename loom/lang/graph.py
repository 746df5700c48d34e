"""The request graph of a traced program.

Nodes are the program's expressions in submission order: constant text, arguments,
gens, selects, role markers, variable scopes, variable reads, forks and joins. A prefix
edge a -> b says b's prompt extends a's text (so b's request shares a's KV); a variable
edge a -> b says b uses the value a generated. Branches number the text streams: 0 is
the program's own, each fork branch gets a new one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loom.lang.ir import Expr

CONSTANT_KINDS = ("text", "role_begin", "role_end")
_SILENT_KINDS = ("var_scope_begin", "var_scope_end")  # write no text


@dataclass(frozen=True)
class Node:
    id: int
    kind: str
    label: str = ""
    branch: int = 0
    expr: Expr | None = None  # the expression of a constant node (to render the prefix)

    def __str__(self) -> str:
        label = f" {self.label!r}" if self.label else ""
        return f"#{self.id} {self.kind}{label}"


class RequestGraph:
    def __init__(self, program: str):
        self.program = program
        self.nodes: list[Node] = []
        self.prefix_edges: list[tuple[int, int]] = []
        self.var_edges: list[tuple[int, int]] = []
        self.definitions: dict[str, int] = {}  # variable -> the node that last set it
        self.stop_reason: str | None = None

    def add(
        self,
        kind: str,
        label: str = "",
        branch: int = 0,
        after: Sequence[int | None] = (),
        expr: Expr | None = None,
    ) -> Node:
        node = Node(len(self.nodes), kind, label, branch, expr)
        self.nodes.append(node)
        self.prefix_edges.extend((a, node.id) for a in after if a is not None)
        return node

    def define(self, name: str, node_id: int) -> None:
        self.definitions[name] = node_id

    def read(self, name: str, node_id: int) -> bool:
        """Record that node_id uses variable `name`; False if nothing traced defines it."""
        source = self.definitions.get(name)
        if source is None:
            return False
        self.var_edges.append((source, node_id))
        return True

    # ---- queries -----------------------------------------------------------------------------

    def find(self, kind: str, label: str | None = None) -> list[Node]:
        return [n for n in self.nodes if n.kind == kind and (label is None or n.label == label)]

    def kinds(self) -> list[str]:
        return [n.kind for n in self.nodes]

    def predecessors(self, node_id: int) -> list[int]:
        return [a for a, b in self.prefix_edges if b == node_id]

    def constant_prefix(self) -> list[Expr]:
        """The constant expressions every run of the program starts with (up to the first
        argument, generation, fork or read): text whose KV all runs can share."""
        out: list[Expr] = []
        for node in self.nodes:
            if node.kind in _SILENT_KINDS:
                continue
            if node.kind not in CONSTANT_KINDS or node.expr is None:
                break
            out.append(node.expr)
        return out

    def __str__(self) -> str:
        head = f"RequestGraph({self.program}): {len(self.nodes)} nodes"
        if self.stop_reason:
            head += f"; trace stopped: {self.stop_reason}"
        lines = [head]
        for node in self.nodes:
            line = f"  [{node.branch}] {node}"
            preds = self.predecessors(node.id)
            uses = [a for a, b in self.var_edges if b == node.id]
            if preds:
                line += f"  <- {', '.join(f'#{p}' for p in preds)}"
            if uses:
                line += f"  uses {', '.join(f'#{u}' for u in uses)}"
            lines.append(line)
        return "\n".join(lines)

    __repr__ = __str__
