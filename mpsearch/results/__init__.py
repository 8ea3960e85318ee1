"""What a search leaves: trial records and result.json (records), objectives, the Pareto front and
its hypervolume (objectives), the trial a search calls best (selection), a search priced on
several targets (compare) and MLflow tracking (tracking). Data and its files only: no view (the
text and HTML views of these live in mpsearch.report) and no scoring.

May import: errors, defaults, cache, metrics
"""
