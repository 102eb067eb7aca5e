"""The dependency graph of resources: topological order, ancestors, descendants, cycles.

Pure logic over address strings; ordering is deterministic (kind order, then name).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

from llmops.engine.addrs import address_sort_key


class Graph:
    """`deps[addr]` = the addresses `addr` depends on (its upstreams)."""

    def __init__(self, deps: Mapping[str, Iterable[str]]) -> None:
        self.deps: dict[str, list[str]] = {
            a: sorted(set(d), key=address_sort_key) for a, d in deps.items()
        }
        self.dependents: dict[str, list[str]] = {a: [] for a in self.deps}
        for a, ds in self.deps.items():
            for d in ds:
                self.dependents.setdefault(d, []).append(a)

    def find_cycle(self) -> list[str] | None:
        """One dependency cycle as [a, b, ..., a], or None."""
        WHITE, GREY, BLACK = 0, 1, 2
        color = {a: WHITE for a in self.deps}
        for start in sorted(self.deps, key=address_sort_key):
            if color[start] != WHITE:
                continue
            stack: list[tuple[str, int]] = [(start, 0)]
            path: list[str] = []
            while stack:
                node, i = stack.pop()
                if i == 0:
                    color[node] = GREY
                    path.append(node)
                ups = [u for u in self.deps.get(node, []) if u in color]
                if i < len(ups):
                    stack.append((node, i + 1))
                    nxt = ups[i]
                    if color[nxt] == GREY:
                        return path[path.index(nxt):] + [nxt]
                    if color[nxt] == WHITE:
                        stack.append((nxt, 0))
                else:
                    color[node] = BLACK
                    path.pop()
        return None

    def order(self) -> list[str]:
        """Topological order (upstreams first), ties broken by kind order then name.

        Raises ValueError on a cycle (validation reports cycles before this is called).
        """
        indeg = {a: sum(1 for d in ds if d in self.deps) for a, ds in self.deps.items()}
        heap = [(address_sort_key(a), a) for a, n in indeg.items() if n == 0]
        heapq.heapify(heap)
        out: list[str] = []
        while heap:
            _, a = heapq.heappop(heap)
            out.append(a)
            for b in self.dependents.get(a, []):
                if b in indeg:
                    indeg[b] -= 1
                    if indeg[b] == 0:
                        heapq.heappush(heap, (address_sort_key(b), b))
        if len(out) != len(self.deps):
            raise ValueError(f"dependency cycle: {' -> '.join(self.find_cycle() or [])}")
        return out

    def ancestors(self, addrs: Iterable[str]) -> set[str]:
        """`addrs` and everything they depend on, transitively."""
        seen: set[str] = set()
        todo = list(addrs)
        while todo:
            a = todo.pop()
            if a in seen:
                continue
            seen.add(a)
            todo.extend(self.deps.get(a, []))
        return seen

    def descendants(self, addrs: Iterable[str]) -> set[str]:
        """Everything that depends on `addrs`, transitively (excluding `addrs` themselves)."""
        seen: set[str] = set()
        todo = [d for a in addrs for d in self.dependents.get(a, [])]
        while todo:
            a = todo.pop()
            if a in seen:
                continue
            seen.add(a)
            todo.extend(self.dependents.get(a, []))
        return seen
