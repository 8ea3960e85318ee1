"""The search engine: what a search searches and how, and the loop that runs it.

Owns SearchOptions (options: one validated, versioned value, stored in the study and in
result.json), budgets as numbers or relative to the target's FP32 and int8 (budgets), the space
a search is set up with (setup), Optuna storages and studies (storage), the trial loop as named
steps (loop.TrialLoop: ask, price, dispatch, on_outcome, tell, publish) and its samplers, the
strategies that seed or replace the sampler (strategy), the budgeted integer program (ilp),
per-layer sensitivity (sensitivity) and a budgeted search's refinement near its best (refine).

May import: errors, defaults, cache, outlock, metrics, targets, tasks, scoring, results, executors
"""
