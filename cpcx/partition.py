"""Partitions of the class list into clusters: canonical form, the vote of Algorithm 1, the 0/1 matrix.

A partition is a set of sets of class names; cluster names are only for display. The canonical form
orders members by class index and clusters by their first member, so two answers that group the classes the
same way compare equal (``groups``) whatever their cluster names or the order the model wrote them in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Partition:
    clusters: tuple[tuple[str, tuple[str, ...]], ...]  # ((name, members), ...) in canonical order

    @classmethod
    def from_assignment(cls, assignment: Sequence[tuple[str, Sequence[str]]], classes: Sequence[str]) -> "Partition":
        order = {c: i for i, c in enumerate(classes)}
        clusters = [(name, tuple(sorted(members, key=order.__getitem__))) for name, members in assignment if members]
        clusters.sort(key=lambda item: order[item[1][0]])
        return cls(tuple(clusters))

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """The canonical partition (no names): equal groups ⇔ the same partition."""
        return tuple(members for _, members in self.clusters)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.clusters]

    def __len__(self) -> int:
        return len(self.clusters)

    def render(self) -> str:
        """One line per cluster, as the refine prompt shows it: ``- animal: cat, dog``."""
        return "\n".join(f"- {name}: {', '.join(members)}" for name, members in self.clusters)

    def summary(self, limit: int = 6) -> str:
        """A short one-line description for warnings: ``4 clusters: vehicle (7), animal (6), …``."""
        parts = [f"{name} ({len(members)})" for name, members in self.clusters[:limit]]
        more = ", …" if len(self.clusters) > limit else ""
        return f"{len(self.clusters)} clusters: {', '.join(parts)}{more}"

    def to_json(self) -> list[dict]:
        return [{"name": name, "members": list(members)} for name, members in self.clusters]

    def matrix(self, classes: Sequence[str]) -> np.ndarray:
        """``(n_classes, n_clusters)`` float32, 1 where the class belongs to the cluster."""
        return membership_matrix(classes, self.clusters)


def membership_matrix(classes: Sequence[str], clusters: Sequence[tuple[str, Sequence[str]]]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(clusters)), dtype=np.float32)
    for j, (_, members) in enumerate(clusters):
        for member in members:
            matrix[index[member], j] = 1.0
    return matrix


@dataclass(frozen=True)
class VoteEntry:
    partition: Partition  # as the earliest query that produced it wrote it (names included)
    queries: tuple[int, ...]  # the query indices r that produced it

    @property
    def count(self) -> int:
        return len(self.queries)


def vote(partitions: Sequence[Partition], queries: Sequence[int] | None = None) -> tuple[int, list[VoteEntry]]:
    """``z0 = most frequent partition``; ties go to the one that appeared first. Returns (winner, histogram).

    The histogram lists each distinct partition once, in order of first appearance.
    """
    if not partitions:
        raise ValueError("vote needs at least one partition")
    queries = list(queries) if queries is not None else list(range(1, len(partitions) + 1))
    seen: dict[tuple, int] = {}
    firsts: list[Partition] = []
    members: list[list[int]] = []
    for partition, r in zip(partitions, queries):
        slot = seen.setdefault(partition.groups, len(firsts))
        if slot == len(firsts):
            firsts.append(partition)
            members.append([])
        members[slot].append(r)
    histogram = [VoteEntry(p, tuple(rs)) for p, rs in zip(firsts, members)]
    best = max(entry.count for entry in histogram)
    winner = next(i for i, entry in enumerate(histogram) if entry.count == best)  # earliest among the tied
    return winner, histogram


def converged(trace: Sequence[Partition]) -> bool:
    """The stop condition s(): the last three partitions are the same (z_{t+1} = z_t = z_{t-1})."""
    return len(trace) >= 3 and trace[-1].groups == trace[-2].groups == trace[-3].groups


def co_association(partitions: Sequence[Partition], classes: Sequence[str]) -> np.ndarray:
    """``(n, n)``: the share of the partitions that put classes i and j in one cluster (1 on the diagonal)."""
    together = np.zeros((len(classes), len(classes)))
    for partition in partitions:
        m = partition.matrix(classes)
        together += m @ m.T
    return together / len(partitions)


def consensus(partitions: Sequence[Partition], classes: Sequence[str]) -> Partition:
    """The partition the answers agree on pair by pair (``clustering.vote: pairs``): average-linkage
    agglomeration on the co-association shares, merging while two clusters are together in more than half of
    the answers on average. Where no two answers are the same partition (a sampled LLM), the most frequent
    partition is a tie of ones, but most pairs of classes still agree; this keeps what they agree on. Each
    consensus cluster takes the name of the answer cluster that overlaps it most (Jaccard; earliest answer on a
    tie); a name already taken gets a number."""
    shares = co_association(partitions, classes)
    groups = [[i] for i in range(len(classes))]
    while len(groups) > 1:
        best, pair = 0.5, None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                link = shares[np.ix_(groups[a], groups[b])].mean()
                if link > best + 1e-12:
                    best, pair = link, (a, b)
        if pair is None:
            break
        a, b = pair
        groups[a] = sorted(groups[a] + groups.pop(b))
    candidates = [(name, set(members)) for p in partitions for name, members in p.clusters]
    taken: dict[str, int] = {}
    named = []
    for group in groups:
        members = {classes[i] for i in group}
        name = max(candidates, key=lambda c: len(members & c[1]) / len(members | c[1]))[0]  # max keeps the first
        taken[name] = taken.get(name, 0) + 1
        named.append((name if taken[name] == 1 else f"{name} {taken[name]}", [classes[i] for i in group]))
    return Partition.from_assignment(named, classes)
