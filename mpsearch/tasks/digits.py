"""The `digits` task: a small CNN on scikit-learn's 8x8 handwritten digits.

Eight quantizable layers (six convolutions, one of them depthwise, and two linear layers), trained
in seconds on a CPU and cached, so that searches, tests and benchmarks run on a real model with a
real accuracy without downloading anything.

Data: `sklearn.datasets.load_digits` (1797 samples, 10 classes), pixels scaled by 1/16 to [0, 1],
split once with `train_test_split(test_size=0.2, random_state=0, stratify=y)`: 1437 training and
360 test samples. Calibration uses 256 training samples, evaluation the whole test split.

Cache: `<cache_dir>/tasks/digits/digits_cnn_v{VERSION}.pt` (the trained state_dict) and next to it
`digits_cnn_v{VERSION}.pt.sha256` (its sha256 in hex). A missing, corrupt or mismatching file is
retrained and rewritten; bump VERSION whenever the architecture, data or training changes.
"""

from __future__ import annotations

import hashlib
import io
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mpsearch import cache
from mpsearch.metrics import accuracy
from mpsearch.tasks.base import Task

__all__ = ["VERSION", "DigitsCNN", "build", "cache_paths", "load_data"]

VERSION = 1
SEED = 0
EPOCHS = 15
BATCH_SIZE = 32
MAX_LR = 3e-3
N_CALIB = 256
CALIB_BATCH = 64
EVAL_BATCH = 120


class DigitsCNN(nn.Module):
    """8x8x1 -> 10 logits. Quantizable layers: features.{0,2,4,6,8,10}, classifier.{1,3}."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),                 # 0: 16x8x8
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),                # 2
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),     # 4: depthwise
            nn.Conv2d(16, 32, 1), nn.ReLU(),                           # 6: pointwise
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),      # 8: 32x4x4
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),                # 10
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(),                      # 1
            nn.Linear(64, 10),                                         # 3
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): inputs N x 1 x 8 x 8 float32 in [0, 1], labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype("float32") / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.2, random_state=0, stratify=d.target)
    return (
        torch.from_numpy(x_tr).unsqueeze(1), torch.from_numpy(y_tr).long(),
        torch.from_numpy(x_te).unsqueeze(1), torch.from_numpy(y_te).long(),
    )


def cache_paths() -> tuple[Path, Path]:
    """(weights file, sha256 file) of the trained model in the mpsearch cache."""
    d = cache.cache_dir("tasks", "digits")
    weights = d / f"digits_cnn_v{VERSION}.pt"
    return weights, weights.with_name(weights.name + ".sha256")


def _train(x: torch.Tensor, y: torch.Tensor) -> DigitsCNN:
    """Deterministic training: fixed seeds, one thread, AdamW + one-cycle LR, random 1-pixel shifts."""
    threads = torch.get_num_threads()
    # One thread: the layers are tiny (threading only adds overhead and stalls on a busy machine)
    # and the result does not depend on the caller's thread count. Restored below.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # seeded locally: the caller's RNG state is left alone
            torch.manual_seed(SEED)
            model = DigitsCNN()
        # Everything random below draws from `gen` only.
        gen = torch.Generator().manual_seed(SEED)
        opt = torch.optim.AdamW(model.parameters(), lr=MAX_LR, weight_decay=0.0)
        steps_per_epoch = (len(x) + BATCH_SIZE - 1) // BATCH_SIZE
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, total_steps=EPOCHS * steps_per_epoch)
        padded = F.pad(x, (1, 1, 1, 1))[:, 0]
        rows = torch.arange(8)
        model.train()
        for _ in range(EPOCHS):
            perm = torch.randperm(len(x), generator=gen)
            shift = torch.randint(0, 3, (len(x), 2), generator=gen)
            # Shift every image by up to one pixel each way (crop an 8x8 window out of the padded 10x10).
            r = (shift[:, 0:1] + rows)[:, :, None]
            c = (shift[:, 1:2] + rows)[:, None, :]
            xa = padded[torch.arange(len(x))[:, None, None], r, c].unsqueeze(1)
            for i in range(0, len(x), BATCH_SIZE):
                idx = perm[i:i + BATCH_SIZE]
                opt.zero_grad()
                F.cross_entropy(model(xa[idx]), y[idx]).backward()
                opt.step()
                sched.step()
        model.eval()
        return model
    finally:
        torch.set_num_threads(threads)


def _load_cached(weights: Path, checksum: Path) -> DigitsCNN | None:
    """The cached model, or None (after a one-line warning if a cache file exists but is unusable)."""
    if not weights.exists() and not checksum.exists():
        return None
    try:
        expected = checksum.read_text().strip()
        if cache.sha256_file(weights) != expected:
            raise ValueError("checksum mismatch")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model = DigitsCNN()
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any unusable cache file means: retrain
        why = " ".join(str(e).split())
        why = why if len(why) <= 200 else why[:197] + "..."
        print(f"mpsearch: warning: cached digits model {weights} unusable ({type(e).__name__}: {why}); "
              "retraining", file=sys.stderr)
        return None
    return model.eval()


def _save(model: nn.Module, weights: Path, checksum: Path) -> None:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    data = buf.getvalue()
    cache.atomic_write_bytes(weights, data)
    cache.atomic_write_bytes(checksum, (hashlib.sha256(data).hexdigest() + "\n").encode())


def build() -> Task:
    """The `digits` task; trains the model on first use (seconds) and caches it."""
    x_tr, y_tr, x_te, y_te = load_data()
    weights, checksum = cache_paths()
    model = _load_cached(weights, checksum)
    trained = model is None
    if model is None:
        print(f"mpsearch: training the digits model once (cached in {weights.parent})", file=sys.stderr)
        t0 = time.perf_counter()
        model = _train(x_tr, y_tr)
        seconds = time.perf_counter() - t0
        _save(model, weights, checksum)
    calib = [x_tr[i:i + CALIB_BATCH] for i in range(0, N_CALIB, CALIB_BATCH)]
    evals = [(x_te[i:i + EVAL_BATCH], y_te[i:i + EVAL_BATCH]) for i in range(0, len(x_te), EVAL_BATCH)]
    extras: dict = {"weights_path": str(weights), "trained_now": trained}
    if trained:
        extras["train_seconds"] = seconds
    return Task(
        name="digits",
        model=model,
        calib_batches=calib,
        eval_batches=evals,
        metric_name="accuracy",
        metric_fn=accuracy,
        kind="classifier",
        description="8-layer CNN (one depthwise conv) on scikit-learn's 8x8 digits, 360 test images",
        extras=extras,
    )
