"""A mixture over source sets: which set each sample of a global batch comes from, by weight.

Every sequence of a by-set `PackedSequences` holds `seq_len` tokens of one source set, so a share
of sequences is a share of tokens. The sample positions of a run are dealt to the sets by smooth
weighted round-robin: before each position every set's credit grows by its weight, the set with
the largest credit (among those with weight > 0; ties to the first name) takes the position and
pays 1. A set's credit is its weighted share minus its count: it never falls to -1 (a set is only
picked while its credit is the largest, at least 1/k of the weights' sum) and stayed below 1.3 in
checks with up to 16 sets and weights changed mid-run, so every window of positions (a global
batch, a rank's slice of it, a few steps) holds each set's share to within about 2 sequences,
whatever the weights did before (dynamic mixtures change them).
A global batch is dealt whole on every rank and each rank takes its slice, so the order depends on
neither the world size nor the loader workers.

The j-th sequence drawn from set s is `perm_(s, e)(j mod N_s)` of its N_s sequences, e = j // N_s:
when a set runs out it starts a new epoch in a new seeded order (`on_exhausted="wrap"`), or the
run stops before the step that would need it (`"stop"`). The state is the weights, the credits and
the sequences drawn per set: a few numbers per set, restored in O(1), never replayed.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from data.permutation import Permutation

WEIGHT_TOLERANCE = 1e-6  # how far from 1 the weights of a config may sum (then they are normalised)


@dataclass
class MixtureState:
    weights: dict[str, float]
    credit: dict[str, float] = field(default_factory=dict)
    drawn: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.credit = {name: float(self.credit.get(name, 0.0)) for name in self.weights}
        self.drawn = {name: int(self.drawn.get(name, 0)) for name in self.weights}

    def as_dict(self) -> dict:
        return asdict(self)

    def with_weights(self, weights: dict[str, float]) -> MixtureState:
        if set(weights) != set(self.weights):
            raise ValueError(f"new weights name {sorted(weights)}, the mixture has {sorted(self.weights)}")
        return MixtureState(normalized(weights), dict(self.credit), dict(self.drawn))


def normalized(weights: dict[str, float]) -> dict[str, float]:
    """Weights that sum to exactly 1 (in float), in sorted name order; refused if negative or all zero."""
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"mixture weights must be >= 0 and not all 0: {weights}")
    total = sum(weights.values())
    return {name: float(weights[name]) / total for name in sorted(weights)}


@dataclass
class Draw:
    """One global batch: its item indices (None if the run must stop first), the state after it, what to log."""

    items: np.ndarray | None
    state: MixtureState
    notes: list[str]


class SetMixture:
    """Deals global batches over the sets' sequence ranges (`PackedSequences(by_set=True).set_ranges`)."""

    def __init__(self, ranges: dict[str, range], seed: int, on_exhausted: str = "wrap"):
        if on_exhausted not in ("wrap", "stop"):
            raise ValueError(f"on_exhausted must be wrap or stop, not {on_exhausted!r}")
        self.ranges, self.seed, self.on_exhausted = ranges, seed, on_exhausted
        self._permutations: dict[tuple[str, int], Permutation] = {}

    def deal(self, state: MixtureState, size: int) -> list[str]:
        """The set of each of `size` positions, by smooth weighted round-robin; updates `state.credit`."""
        active = [name for name, weight in state.weights.items() if weight > 0]
        credit, weights = state.credit, state.weights
        dealt = []
        for _ in range(size):
            for name in active:
                credit[name] += weights[name]
            chosen = max(active, key=credit.__getitem__)
            credit[chosen] -= 1.0
            dealt.append(chosen)
        return dealt

    def _permutation(self, name: str, epoch: int) -> Permutation:
        key = (name, epoch)
        if key not in self._permutations:
            if len(self._permutations) > 64:  # only the current and next epoch of each set are ever asked for
                self._permutations.clear()
            seed = (self.seed * 1_000_003 + epoch) * 2**32 + zlib.crc32(name.encode())
            self._permutations[key] = Permutation(len(self.ranges[name]), seed)
        return self._permutations[key]

    def draw(self, state: MixtureState, size: int, step: int) -> Draw:
        """Global batch `step` (0-based) of `size` samples, from `state` (the state before it)."""
        after = MixtureState(dict(state.weights), dict(state.credit), dict(state.drawn))
        dealt = np.array(self.deal(after, size))
        items = np.empty(size, dtype=np.int64)
        notes = []
        for name in sorted(set(dealt.tolist())):
            where = np.flatnonzero(dealt == name)
            total = len(self.ranges[name])
            draws = state.drawn[name] + np.arange(len(where), dtype=np.int64)
            epoch_before, epoch_after = state.drawn[name] // total, int(draws[-1]) // total
            if epoch_after > epoch_before:
                if self.on_exhausted == "stop":
                    notes.append(f"source set {name} has run out: all its {total:,} sequences were trained on by "
                                 f"step {step} and step {step + 1} needs more (data.on_exhausted=stop)")
                    return Draw(None, state, notes)
                notes.append(f"source set {name}: all its {total:,} sequences trained on; step {step + 1} starts "
                             f"its epoch {epoch_after + 1} in a new order (data.on_exhausted=wrap)")
            for epoch in np.unique(draws // total):
                mask = draws // total == epoch
                items[where[mask]] = self.ranges[name].start + self._permutation(name, int(epoch))(draws[mask] % total)
            after.drawn[name] += len(where)
        return Draw(items, after, notes)
