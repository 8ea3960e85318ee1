"""Fitting hardware profiles to measurements: `mpsearch calibrate`.

cpu: latencies of deployed graphs measured in ONNX Runtime on this machine; gpu: matrix products
timed on a CUDA GPU; fit: the roofline fit and the fidelity figures both report. Never imports
the API or the search engine: a profile is fitted from the model and the target alone.

May import: errors, defaults, cache, host, metrics, onnx_export, targets, tasks, scoring, deploy
"""
