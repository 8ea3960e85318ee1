"""Deployment: the graph a configuration ships as, built once and used everywhere.

The rule that says which tensors a deployed int8 graph quantizes is plain data and lives with
the cost model that prices it (hw_models.graph); mpsearch.scoring.onnx_graph reads it off a model's
FP32 export (`read_graph`, for the evaluator). This package builds the ONNX graph it describes
(build), times graphs in ONNX Runtime (measure), checks the simulated quantizer against real int8
kernels (faithfulness), exports and applies a searched configuration (export) and measures a
search's front on real hardware (verify). The evaluator simulates exactly the tensors the rule
names, `mpsearch export --format onnx` writes the graph `build` makes, `mpsearch calibrate` times
it and `mpsearch verify` measures it. ONNX and ONNX Runtime are imported where a graph is built or
run; scoring does not import this package.

May import: errors, cache, host, outlock, metrics, onnx_export, targets, tasks, scoring, results, report, executors
"""
