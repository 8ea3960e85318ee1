"""Views of results: plain text for the terminal (text: Pareto tables, summaries, next steps, the
compare table, the built-in targets) and the HTML report with its figures and PNGs (html). Views
read results; nothing below the API and the command line imports a view except `verify`, which
prints and writes its own.

May import: errors, cache, results
"""
