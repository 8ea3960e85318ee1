"""A user-defined task: a small MLP on scikit-learn's breast-cancer data set, end to end.

mpsearch searches over any model you can wrap in a `mpsearch.Task`. A task is

    name           what tables, result.json and MLflow call it
    model          the FP32 nn.Module (mpsearch puts it in eval mode); its output on a batch is a
                   tensor. Its Conv/Linear layers are the ones that get a precision each.
    calib_batches  a list of input batches (a tensor, or a tuple of tensors passed positionally),
                   no targets: used once to calibrate activation ranges. A few hundred samples.
    eval_batches   a list of (inputs, target) pairs; the metric is computed over all of them.
    metric_name    "accuracy", "f1", ...
    metric_fn      metric_fn(outputs, targets) -> float, higher is better; outputs[i] is the
                   model's output on eval_batches[i], targets[i] that batch's target.
                   mpsearch.metrics has accuracy and label-free proxies.
    fp32_metric    optional: computed from the model when left out.
    kind           "classifier" (logits: KL and top-1 agreement proxies apply), "embedding"
                   (cosine similarity applies) or "other".
    description    one line for reports.

Expose a function that takes no arguments and returns the Task, then name it as
`path/to/file.py:function` (or `package.module:function` if it is importable):

    mpsearch search --task examples/custom_task.py:build_task --target x86-vnni --trials 20

or run this file (`python examples/custom_task.py`) to search from Python.
Training here is deterministic (fixed seeds, full-batch Adam) and takes well under a second.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpsearch.metrics import accuracy
from mpsearch.tasks import Task


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised features (scaler fitted on the training split only) and int64 labels."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    return (
        torch.tensor(scaler.transform(x_tr), dtype=torch.float32), torch.tensor(y_tr, dtype=torch.long),
        torch.tensor(scaler.transform(x_te), dtype=torch.float32), torch.tensor(y_te, dtype=torch.long),
    )


def build_task() -> Task:
    x_tr, y_tr, x_te, y_te = _data()
    # Seed locally (the caller's RNG state is left alone) and train on one thread: layers this
    # small gain nothing from threads, and on a busy machine extra threads slow them down a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = nn.Sequential(
                nn.Linear(30, 64), nn.ReLU(),
                nn.Linear(64, 32), nn.ReLU(),
                nn.Linear(32, 2),
            )
            opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
            model.train()
            for _ in range(150):  # full batch: no shuffling, so no other randomness
                opt.zero_grad()
                F.cross_entropy(model(x_tr), y_tr).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()

    return Task(
        name="breast_cancer_mlp",
        model=model,
        calib_batches=[x_tr[i:i + 64] for i in range(0, 256, 64)],
        eval_batches=[(x_te[i:i + 48], y_te[i:i + 48]) for i in range(0, len(x_te), 48)],
        metric_name="accuracy",
        metric_fn=accuracy,
        kind="classifier",
        description="3-layer MLP on scikit-learn's breast-cancer data (143 test samples)",
    )


if __name__ == "__main__":
    import mpsearch

    result = mpsearch.search(build_task(), target="x86-vnni", n_trials=20, seed=0)
    best = result.best
    if best is None:
        print("no feasible trial")
    else:
        t = result.trial(best)
        ref = result.reference
        print(f"best trial {t.number}: accuracy {t.metric:.4f} (fp32 {ref['fp32_metric']:.4f}), "
              f"latency {t.latency_ms:.4f} ms (fp32 {ref['fp32_latency_ms']:.4f}), "
              f"{t.weight_bytes} weight bytes (fp32 {ref['fp32_weight_bytes']})")
        for fqn, choice in t.config.items():
            print(f"  {fqn}: weight {choice.weight}, activation {choice.activation}")
