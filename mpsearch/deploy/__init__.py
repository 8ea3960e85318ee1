"""Deployment: the graph a configuration ships as, built once and used everywhere.

Owns the one rule that says which tensors a deployed int8 graph quantizes (`plan`), the ONNX
graph built from it (`build`), and the check of a search's front on real hardware (`verify`).
The evaluator simulates exactly the tensors `plan` names, `mpsearch export --format onnx`
writes the graph `build` makes, `mpsearch calibrate` times it and `mpsearch verify` measures it.

May import hw_models, search_spaces and mpsearch's evaluator, analysis, onnx_export and
tasks; ONNX and ONNX Runtime are imported where a graph is built or run.
"""
