"""Scoring a candidate: how a configuration is quantized and what that does to the model's output.

Owns the model analysis (analysis: quantizable layers in execution order), the simulated
quantizers (quant) and AdaRound (adaround), batch-norm folding (folding), the evaluator's view of
the deployed graph read off the FP32 export (onnx_graph) and the Evaluator with its
QuantSettings (evaluator). Knows nothing of searches, studies or results.

May import: errors, cache, metrics, onnx_export, tasks
"""
