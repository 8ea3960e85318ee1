"""Deployment: the graph a configuration ships as, built once and used everywhere.

The rule that says which tensors a deployed int8 graph quantizes is plain data and lives with
the cost model that prices it (hw_models.graph); mpsearch.onnx_graph reads it off a model's FP32
export (`read_graph`, for the evaluator), this package builds the ONNX graph it describes
(`build.build`) and checks a search's front on real hardware (`verify`). The evaluator simulates
exactly the tensors the rule names, `mpsearch export --format onnx` writes the graph `build`
makes, `mpsearch calibrate` times it and `mpsearch verify` measures it.

May import hw_models, search_spaces and mpsearch's evaluator, analysis, onnx_export, onnx_graph
and tasks; the evaluator does not import this package (it reads the graph through
mpsearch.onnx_graph). ONNX and ONNX Runtime are imported where a graph is built or run.
"""
