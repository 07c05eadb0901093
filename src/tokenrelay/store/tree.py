"""A conversation's messages as a tree: branches, versions, and where a request continues.

Each message has a ``parent_id`` (NULL for a first message); the children of one parent
are the versions of that turn, oldest first (by ``seq``, the order they were stored).
The conversation's ``active_id`` is the last message of the branch shown. Pure functions
over the rows of one conversation, shared by the store's reads and writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Node = Mapping[str, Any]  # at least id, parent_id, seq, role, content


class Tree:
    """The messages of one conversation, indexed by id and by parent."""

    def __init__(self, nodes: Iterable[Node]) -> None:
        ordered = sorted(nodes, key=lambda n: n["seq"])
        self.by_id: dict[str, Node] = {n["id"]: n for n in ordered}
        self.children: dict[str | None, list[Node]] = {}
        for node in ordered:
            self.children.setdefault(self.parent_of(node), []).append(node)
        self.newest = ordered[-1] if ordered else None

    def parent_of(self, node: Node) -> str | None:
        """The parent's id; a parent that is not in the tree makes the node a root."""
        parent = node.get("parent_id")
        return parent if parent in self.by_id else None

    def leaf_from(self, message_id: str) -> str:
        """The newest message under ``message_id`` (or itself): always a leaf, and the end
        of the branch last added to there, i.e. where the conversation was left."""
        newest = self.by_id[message_id]
        stack = [message_id]
        seen: set[str] = set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            for kid in self.children.get(current, ()):
                if kid["seq"] > newest["seq"]:
                    newest = kid
                stack.append(kid["id"])
        return str(newest["id"])

    def branch(self, active_id: str | None) -> list[Node]:
        """The messages from a root down through ``active_id`` to a leaf (the newest
        message's branch when ``active_id`` is unknown)."""
        if active_id not in self.by_id:
            if self.newest is None:
                return []
            active_id = str(self.newest["id"])
        node: Node | None = self.by_id[self.leaf_from(active_id)]
        path: list[Node] = []
        seen: set[str] = set()
        while node is not None and node["id"] not in seen:
            seen.add(node["id"])
            path.append(node)
            parent = self.parent_of(node)
            node = self.by_id[parent] if parent is not None else None
        path.reverse()
        return path

    def versions(self, node: Node) -> dict[str, Any]:
        """``version`` (1-based), ``versions`` and ``sibling_ids`` of a message's turn."""
        siblings = [str(s["id"]) for s in self.children.get(self.parent_of(node), [])]
        return {"version": siblings.index(node["id"]) + 1, "versions": len(siblings),
                "sibling_ids": siblings}

    def continuation(
        self, active_id: str | None, said: Sequence[tuple[str, str]]
    ) -> tuple[str | None, int]:
        """Where a request's messages leave the stored tree: ``(parent_id, matched)``.

        From the roots down, each sent ``(role, text)`` is matched to a child with the same
        role and text (the one on the active branch if any, else the newest). An answer
        stored without text, which the page does not send back (stopped before its first
        token), is stepped over. The first unmatched message starts a new branch under
        ``parent_id``; ``matched`` sent messages were found.
        """
        shown = {n["id"] for n in self.branch(active_id)}
        parent: str | None = None
        matched = 0
        for _ in range(len(self.by_id) + len(said)):
            if matched >= len(said):
                break
            role, text = said[matched]
            kids = self.children.get(parent, [])
            same = [k for k in kids if k["role"] == role and k["content"] == text]
            if same:
                matched += 1
            elif role == "user":
                same = [k for k in kids if k["role"] == "assistant" and not k["content"]]
            if not same:
                break
            parent = str(_prefer(same, shown)["id"])
        return parent, matched


def _prefer(candidates: list[Node], shown: set[str]) -> Node:
    for node in candidates:
        if node["id"] in shown:
            return node
    return candidates[-1]
