"""Arc-standard transitions, their static oracle, and Chen & Manning's (2014) 48 features.

Chen & Manning, "A Fast and Accurate Dependency Parser using Neural Networks" (EMNLP 2014),
the parser of the paper's parsing experiment. Words are numbered 1..n; 0 is the artificial
ROOT. A parser state holds a stack (ROOT at the bottom; ``s1`` is the top, ``s2`` the one below),
a buffer (the words ``next..n``; ``b1`` is its first) and the arcs built so far. Transitions,
with ``L`` dependency labels, are numbered:

    0            SHIFT         move b1 onto the stack
    1 + l        LEFT-ARC(l)   add the arc s1 -l-> s2 and pop s2 (s2 must not be ROOT)
    1 + L + l    RIGHT-ARC(l)  add the arc s2 -l-> s1 and pop s1 (with s2 = ROOT only once the
                               buffer is empty, so that ROOT gets exactly one dependent)

A sentence of n words takes exactly 2n transitions. The static oracle (LEFT-ARC when s2's gold
head is s1; RIGHT-ARC when s1's gold head is s2 and s1 has all its gold dependents; else SHIFT)
reproduces every projective tree and gets stuck on a non-projective one: it raises
``NonProjectiveError`` there, and the training set keeps projective sentences only.

Features (``features``), in Chen & Manning's order, 18 word + 18 tag + 12 label ids:

    positions  s3 s2 s1 b1 b2 b3, then for s1 and for s2:
               lc1 rc1 lc2 rc2 lc1(lc1) rc1(rc1)
    words      the word at each of the 18 positions
    tags       the POS tag at each of the 18 positions
    labels     the arc label of each of the 12 child positions

``lc1``/``lc2`` are the leftmost/second-leftmost dependents left of the word, ``rc1``/``rc2``
the rightmost/second-rightmost right of it. An empty position gives the NULL id (0 in every
table); ROOT has its own word and tag ids.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "SHIFT",
    "LEFT",
    "RIGHT",
    "N_FEATURES",
    "NonProjectiveError",
    "State",
    "Transitions",
    "features",
    "is_projective",
    "oracle",
    "oracle_examples",
]

SHIFT, LEFT, RIGHT = 0, 1, 2  # transition kinds
N_WORD, N_TAG, N_LABEL = 18, 18, 12
N_FEATURES = N_WORD + N_TAG + N_LABEL  # 48
NULL = -1  # the index of an empty position: the last slot of every per-word list


class NonProjectiveError(ValueError):
    """The oracle cannot build this tree with arc-standard transitions (it crosses arcs)."""


class Transitions:
    """The transition ids for a label set: ``0`` SHIFT, ``1 + l`` LEFT(l), ``1 + L + l`` RIGHT(l).

    ``kinds[t]`` is SHIFT, LEFT or RIGHT; ``labels[t]`` the label index (-1 for SHIFT).
    """

    def __init__(self, labels: Sequence[str]) -> None:
        self.names = list(labels)
        self.index = {name: i for i, name in enumerate(self.names)}
        n = len(self.names)
        self.n = 1 + 2 * n
        self.kinds = [SHIFT] + [LEFT] * n + [RIGHT] * n
        self.labels = [-1] + list(range(n)) * 2

    def id(self, kind: int, label: int) -> int:
        """The id of the transition of this kind and label index."""
        if kind == SHIFT:
            return 0
        return 1 + label + (len(self.names) if kind == RIGHT else 0)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Transitions({len(self.names)} labels, {self.n} transitions)"


class State:
    """A parser configuration of an n-word sentence; ``apply(t, kind, label)`` advances it.

    Per-word lists have n + 2 slots: 0 is ROOT, 1..n the words, and the last (index -1) the
    NULL slot, so that an empty position (-1) reads NULL without a branch. ``lefts[h]`` holds
    h's left dependents nearest first (arc-standard attaches them moving outwards), so
    ``lefts[h][-1]`` is the leftmost; ``rights[h]`` likewise, ``rights[h][-1]`` the rightmost.
    """

    __slots__ = ("n", "stack", "next", "heads", "labels", "lefts", "rights")

    def __init__(self, n: int) -> None:
        self.n = n
        self.stack = [0]
        self.next = 1  # the buffer is words next..n
        self.heads = [-1] * (n + 2)
        self.labels = [-1] * (n + 2)  # label index of each attached word, -1 if none
        self.lefts: list[list[int]] = [[] for _ in range(n + 2)]
        self.rights: list[list[int]] = [[] for _ in range(n + 2)]

    def can_shift(self) -> bool:
        return self.next <= self.n

    def can_left(self) -> bool:
        return len(self.stack) > 2  # s2 exists and is not ROOT

    def can_right(self) -> bool:
        return len(self.stack) > 2 or (len(self.stack) == 2 and self.next > self.n)

    def terminal(self) -> bool:
        return self.next > self.n and len(self.stack) == 1

    def apply(self, kind: int, label: int) -> None:
        """Apply a transition (its kind and label index); it must be legal."""
        stack = self.stack
        if kind == SHIFT:
            stack.append(self.next)
            self.next += 1
        elif kind == LEFT:
            head, dep = stack[-1], stack.pop(-2)
            self.heads[dep], self.labels[dep] = head, label
            self.lefts[head].append(dep)
        else:
            dep = stack.pop()
            head = stack[-1]
            self.heads[dep], self.labels[dep] = head, label
            self.rights[head].append(dep)


def features(state: State, words: Sequence[int], tags: Sequence[int]) -> list[int]:
    """The 48 feature ids of a state (see the module docstring).

    ``words`` and ``tags`` are id lists of n + 2 entries: ROOT's id, the n words', then NULL's.
    Label ids are the label index + 1 (0 is NULL).
    """
    stack, lefts, rights, n, nxt = state.stack, state.lefts, state.rights, state.n, state.next
    depth = len(stack)
    pos = [
        stack[-3] if depth > 2 else NULL,
        stack[-2] if depth > 1 else NULL,
        stack[-1] if depth > 0 else NULL,
        nxt if nxt <= n else NULL,
        nxt + 1 if nxt + 1 <= n else NULL,
        nxt + 2 if nxt + 2 <= n else NULL,
    ]
    for h in (pos[2], pos[1]):  # s1, then s2
        left, right = lefts[h], rights[h]  # the NULL slot's lists are empty
        lc1 = left[-1] if left else NULL
        rc1 = right[-1] if right else NULL
        lc2 = left[-2] if len(left) > 1 else NULL
        rc2 = right[-2] if len(right) > 1 else NULL
        llc = lefts[lc1][-1] if lefts[lc1] else NULL
        rrc = rights[rc1][-1] if rights[rc1] else NULL
        pos += (lc1, rc1, lc2, rc2, llc, rrc)
    labels = state.labels
    return (
        [words[p] for p in pos]
        + [tags[p] for p in pos]
        + [labels[p] + 1 for p in pos[6:]]  # labels[-1] is -1: NULL -> 0
    )


def is_tree(heads: Sequence[int]) -> bool:
    """Whether ``heads`` (``heads[i]`` the 1-based head of word i + 1, 0 = ROOT) is one tree:
    every head in range, exactly one word on ROOT, every word reaching ROOT (no cycle)."""
    n = len(heads)
    if n == 0 or any(not 0 <= h <= n for h in heads) or list(heads).count(0) != 1:
        return False
    for d in range(1, n + 1):
        w, steps = d, 0
        while w != 0:
            w, steps = heads[w - 1], steps + 1
            if steps > n:  # longer than any path to ROOT: a cycle
                return False
    return True


def is_projective(heads: Sequence[int]) -> bool:
    """Whether ``heads`` (``heads[i]`` the 1-based head of word i + 1, 0 = ROOT) is a tree
    (``is_tree``) with no crossing arcs, the arc from ROOT included. Not a tree: False."""
    if not is_tree(heads):
        return False
    spans = [tuple(sorted((h, d))) for d, h in enumerate(heads, start=1)]
    for a1, b1 in spans:
        for a2, b2 in spans:
            if a1 < a2 < b1 < b2:
                return False
    return True


def _oracle_step(state: State, gold: Sequence[int], missing: list[int], rel: Sequence[int]):
    """The static oracle's (kind, label) for a state; ``missing[h]``: h's gold dependents not
    yet attached. ``gold`` and ``rel`` are indexed by word (slot 0 unused)."""
    stack = state.stack
    if len(stack) > 2 and gold[stack[-2]] == stack[-1]:
        return LEFT, rel[stack[-2]]
    if len(stack) > 1:
        s1, s2 = stack[-1], stack[-2]
        if gold[s1] == s2 and missing[s1] == 0 and (s2 != 0 or not state.can_shift()):
            return RIGHT, rel[s1]
    if state.can_shift():
        return SHIFT, -1
    raise NonProjectiveError(
        f"the oracle is stuck with stack {stack} and an empty buffer: the tree (heads "
        f"{list(gold[1:])}) is not projective; arc-standard can only build projective trees"
    )


def _walk(heads: Sequence[int], labels: Sequence[int], words=None, tags=None):
    n = len(heads)
    if len(labels) != n:
        raise ValueError(f"heads and labels differ in length: {n} and {len(labels)}")
    gold, rel = [-1, *heads], [-1, *labels]
    missing = [0] * (n + 2)
    for h in heads:
        missing[h] += 1
    state = State(n)
    while not state.terminal():
        feats = features(state, words, tags) if words is not None else None
        kind, label = _oracle_step(state, gold, missing, rel)
        yield kind, label, feats
        if kind != SHIFT:
            missing[state.stack[-1] if kind == LEFT else state.stack[-2]] -= 1
        state.apply(kind, label)


def oracle(heads: Sequence[int], labels: Sequence[int]) -> list[tuple[int, int]]:
    """The oracle's transitions, as (kind, label index) pairs, for a gold tree.

    Args:
        heads: the 1-based head of each word (0 = ROOT).
        labels: the label index of each word's arc.

    Raises ``NonProjectiveError`` for a non-projective tree.
    """
    return [(kind, label) for kind, label, _ in _walk(heads, labels)]


def oracle_examples(
    heads: Sequence[int],
    labels: Sequence[int],
    words: Sequence[int],
    tags: Sequence[int],
    transitions: Transitions,
) -> tuple[list[list[int]], list[int]]:
    """Training examples of one sentence: the 48 features of each oracle state and the id of
    the gold transition taken there (2n of each). ``words``/``tags`` as for ``features``."""
    feats, gold = [], []
    for kind, label, f in _walk(heads, labels, words, tags):
        feats.append(f)
        gold.append(transitions.id(kind, label))
    return feats, gold
