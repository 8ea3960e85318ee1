"""Budget-aware refinement: after the ILP seeds, search the budget's neighbourhood, and stop when
nothing improves.

A budgeted search wants the best configuration that fits (mpsearch.results.selection, mode
"most_accurate"), and that configuration uses the budget: the ILP seeds sit at and just under it
(strategy.NEAR_BUDGET). A sampler spreads its trials over the whole metric/cost front instead (on
mobilenet_v2 at 75% of int8 weights none of 54 TPE trials after the seeds beat them). So, once the
seeds are used, the Refiner proposes the neighbours of the best trial so far: one layer (or tie
group) moved to another pair, alone or paid for by another, in the order of the change in summed
per-layer sensitivity the table predicts (mpsearch.engine.sensitivity, the ILP's objective): the
first untried one the cost model prices within every budget. A measured metric that disagrees
with the additive prediction is what these trials find out. When no neighbour fits, the sampler
proposes as before.

Early stop: when `patience` trials have been told since the best trial was found (its number is
that many behind the newest), the search ends and says so (settings.stopped_early).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

from hw_models import Candidate, CostModel, LayerChoice
from mpsearch.engine.budgets import Budgets
from mpsearch.results.records import TrialRecord
from mpsearch.results.selection import DropBudget, most_accurate, ranking_objective
from search_spaces import SearchSpace

MIN_PATIENCE = 10  # trials without a better configuration before a budgeted search stops


def default_patience(n_trials: int) -> int:
    """A fifth of the trials, at least MIN_PATIENCE."""
    return max(MIN_PATIENCE, n_trials // 5)


class Refiner:
    """Neighbours of the best trial within the budgets (module doc), and when to stop."""

    def __init__(self, space: SearchSpace, cost_model: CostModel, budgets: Budgets,
                 sensitivity: Mapping[str, Mapping[LayerChoice, float]], drop: DropBudget,
                 objectives: Sequence[str], patience: int | None) -> None:
        self.space, self.cost_model, self.budgets, self.drop = space, cost_model, budgets, drop
        self.objective = ranking_objective(objectives)
        self.patience = patience
        # units: a free layer with the layers tied to it, each pair's summed sensitivity
        self.units = []
        for o in space.free:
            if len(o.pairs) < 2:
                continue  # pinned or single-choice
            members = [f for f in space.fqns if space.leader(f) == o.fqn]
            sens = {c: sum(sensitivity[f][c] for f in members) for c in o.pairs}
            self.units.append((members, sens))
        self.proposed: set[Candidate] = set()

    def best(self, trials: Sequence[TrialRecord]) -> TrialRecord | None:
        pool = [t for t in trials if t.state == "complete" and t.feasible and t.metric is not None]
        return most_accurate(pool, self.drop.points, self.objective)

    def stalled(self, trials: Sequence[TrialRecord]) -> TrialRecord | None:
        """The best trial, when `patience` trials have been told since it (None: go on)."""
        if not self.patience or not trials:
            return None
        best = self.best(trials)
        if best is None:
            return None
        newest = max(t.number for t in trials)
        return best if newest - best.number >= self.patience else None

    def propose(self, trials: Sequence[TrialRecord]) -> Candidate | None:
        """The untried neighbour of the best trial with the largest predicted gain that fits every
        budget; None when there is none (or no best yet)."""
        best = self.best(trials)
        if best is None:
            return None
        tried = {t.config for t in trials} | self.proposed
        for _, cand in self.neighbours(best.config):
            if cand in tried:
                continue
            cost = self.cost_model.price(cand)
            if not cost.feasible or self.budgets.reason(cost):
                continue
            self.proposed.add(cand)
            return cand
        return None

    def neighbours(self, config: Candidate) -> Iterator[tuple[float, Candidate]]:
        """(predicted change of summed sensitivity, candidate), most negative first: each unit
        moved to another pair, and each unit moved to a less sensitive pair together with another
        moved to a more sensitive one (which pays for it within the budget). Those predicted no
        better come last: they explore the neighbourhood when the prediction has run out."""
        ups, moves = [], []
        for i, (members, sens) in enumerate(self.units):
            now = sens[config[members[0]]]
            for k, (c, s) in enumerate(sens.items()):
                if c == config[members[0]] or not math.isfinite(s):
                    continue
                (ups if s < now else moves).append((s - now, (i, k)))
        changes = [(d, (u,)) for d, u in ups + moves]
        changes += [(du + dv, (u, v)) for du, u in ups for dv, v in moves if v[0] != u[0]]
        changes.sort()  # by predicted change, then by unit and pair position: the same order in every process
        for delta, move in changes:
            chosen = dict(config.items())
            for i, k in move:
                members, sens = self.units[i]
                c = list(sens)[k]
                for f in members:
                    chosen[f] = c
            yield delta, Candidate((f, chosen[f]) for f in self.space.fqns)
