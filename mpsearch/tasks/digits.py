"""The `digits` task: a small CNN on scikit-learn's 8x8 handwritten digits.

Eight quantizable layers (six convolutions, one of them depthwise, and two linear layers), so that
searches, tests and benchmarks run on a real model with a real accuracy without downloading
anything.

Data: `sklearn.datasets.load_digits` (1797 samples, 10 classes), pixels scaled by 1/16 to [0, 1],
split once with `train_test_split(test_size=0.2, random_state=0, stratify=y)`: 1437 training and
360 test samples. Calibration uses 256 training samples, evaluation the whole test split.

Weights: shipped inside the package, `mpsearch/tasks/data/digits_cnn_v{VERSION}.pt` (a torch
state_dict, 221 KiB), and checked against WEIGHTS_SHA256 on every load; a missing or damaged file
is refused (TaskLoadError), never silently replaced. They are shipped rather than trained at
set-up because training is deterministic only on one kind of CPU: torch picks other float kernels
per CPU (AVX-512, AVX2, or the portable ones with ATEN_CPU_CAPABILITY=default), the rounding
differs, and so did the trained weights, the FP32 accuracy and every quantized score, from one
machine to the next.

The training code stays (`train`: fixed seeds, one thread); the shipped file was made with

    python -m mpsearch.tasks.digits --write     # trains (seconds) and rewrites the packaged file

on an x86-64 CPU with AVX-512 (torch 2.14, CPU capability AVX512): FP32 accuracy 356/360. On
another CPU the same command writes other bytes: then set WEIGHTS_SHA256 to the digest it prints
and bump VERSION (the evaluator and sensitivity caches are keyed by the model, so they follow).
`python -m mpsearch.tasks.digits --out FILE` trains into FILE and leaves the package alone.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mpsearch.errors import TaskLoadError
from mpsearch.metrics import accuracy
from mpsearch.tasks.base import Task

__all__ = ["VERSION", "WEIGHTS_SHA256", "DigitsCNN", "build", "load_data", "load_model", "train", "weights_path"]

VERSION = 1
# sha256 of mpsearch/tasks/data/digits_cnn_v{VERSION}.pt (see the module doc to regenerate it)
WEIGHTS_SHA256 = "1fefb3f25cb4af307f11239f26d18b078af76681158ec56e3b88bb9994242566"
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


def train(x: torch.Tensor, y: torch.Tensor) -> DigitsCNN:
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




def weights_path() -> Path:
    """The packaged weights file (mpsearch/tasks/data/digits_cnn_v{VERSION}.pt)."""
    return Path(str(resources.files("mpsearch.tasks") / "data" / f"digits_cnn_v{VERSION}.pt"))


def state_bytes(model: nn.Module) -> bytes:
    """The model's state_dict as torch.save writes it to a buffer (the bytes of the packaged
    file: saved to a buffer, not a path, so that they do not depend on the file's name)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def load_model(path: str | Path | None = None, sha256: str = WEIGHTS_SHA256) -> DigitsCNN:
    """The trained model from `path` (default: the packaged file), in eval mode. Raises
    TaskLoadError, naming the file and what to do, when it is missing, its sha256 is not `sha256`,
    or it does not hold this architecture's state_dict."""
    path = Path(path) if path is not None else weights_path()
    fix = ("reinstall mpsearch, or regenerate the file with `python -m mpsearch.tasks.digits --write` "
           "(see mpsearch/tasks/digits.py)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TaskLoadError(f"digits weights {path} cannot be read ({e.strerror or e}): {fix}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise TaskLoadError(f"digits weights {path} are damaged or not the packaged ones (sha256 {digest[:16]}..., "
                            f"expected {sha256[:16]}...): {fix}")
    model = DigitsCNN()
    try:
        model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - a file with the right digest but the wrong contents
        why = " ".join(str(e).split())[:200]
        raise TaskLoadError(f"digits weights {path} do not fit the digits model ({type(e).__name__}: {why})") from None
    return model.eval()


def build() -> Task:
    """The `digits` task, with the packaged trained weights (checked against WEIGHTS_SHA256)."""
    x_tr, _, x_te, y_te = load_data()
    model = load_model()
    calib = [x_tr[i:i + CALIB_BATCH] for i in range(0, N_CALIB, CALIB_BATCH)]
    evals = [(x_te[i:i + EVAL_BATCH], y_te[i:i + EVAL_BATCH]) for i in range(0, len(x_te), EVAL_BATCH)]
    return Task(
        name="digits",
        model=model,
        calib_batches=calib,
        eval_batches=evals,
        metric_name="accuracy",
        metric_fn=accuracy,
        kind="classifier",
        description="8-layer CNN (one depthwise conv) on scikit-learn's 8x8 digits, 360 test images",
        extras={"weights_path": str(weights_path()), "weights_sha256": WEIGHTS_SHA256},
    )


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpsearch.tasks.digits",
                                description="Train the digits model (deterministic on one kind of CPU) and write "
                                            "its weights.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--write", action="store_true",
                       help=f"rewrite the packaged file ({weights_path()}); then set WEIGHTS_SHA256 to the printed "
                            "digest and bump VERSION")
    where.add_argument("--out", metavar="FILE", help="write the weights to FILE instead")
    args = p.parse_args(argv)
    x_tr, y_tr, x_te, y_te = load_data()
    t0 = time.perf_counter()
    model = train(x_tr, y_tr)
    seconds = time.perf_counter() - t0
    data = state_bytes(model)
    out = weights_path() if args.write else Path(args.out)
    out.write_bytes(data)
    with torch.no_grad():
        correct = int((model(x_te).argmax(1) == y_te).sum())
    digest = hashlib.sha256(data).hexdigest()
    print(f"wrote {out} ({len(data)} bytes, trained in {seconds:.1f} s on CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}): FP32 accuracy "
          f"{correct}/{len(y_te)}; sha256 {digest}")
    if digest != WEIGHTS_SHA256:
        print(f"not the packaged weights (WEIGHTS_SHA256 {WEIGHTS_SHA256}); to ship these, set WEIGHTS_SHA256 "
              "to the digest above and bump VERSION", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
