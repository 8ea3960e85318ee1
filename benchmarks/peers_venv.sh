#!/usr/bin/env bash
# The peer benchmark's Sony Model Compression Toolkit (MCT) venv, kept apart from mpsearch's own
# dependencies (MCT is no dependency of mpsearch).
#
#   benchmarks/peers_venv.sh            # prints the venv's python on its last line of stdout
#   MCT_VERSION=2.6.1 MPSEARCH_PYTHON=/path/to/.venv/bin/python benchmarks/peers_venv.sh
#
# Creates (once) ${XDG_CACHE_HOME:-$HOME/.cache}/mpsearch/peers/mct-<version>: a plain venv of the
# same base interpreter as mpsearch's, with a .pth file adding the site-packages of mpsearch's
# dependency venv (the one that holds torch, torchvision, numpy, scipy), so torch is not downloaded
# again; then `pip install model-compression-toolkit==<version>`: pip sees the packages already on
# that path and installs only the extra ones MCT needs (mct-quantizers, networkx, PuLP, ...) into
# the peers venv. Nothing is written into mpsearch's venvs. Idempotent: a venv that already imports
# both model_compression_toolkit and torch is left as it is. Progress goes to stderr.
set -euo pipefail

MCT_VERSION="${MCT_VERSION:-2.6.1}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { echo "peers_venv: $*" >&2; }

# mpsearch's python: given, else the repository's .venv (this script lives in benchmarks/)
if [[ -z "${MPSEARCH_PYTHON:-}" ]]; then
  for cand in "$here/../.venv/bin/python"; do
    if [[ -x "$cand" ]]; then MPSEARCH_PYTHON="$cand"; break; fi
  done
fi
[[ -n "${MPSEARCH_PYTHON:-}" && -x "$MPSEARCH_PYTHON" ]] || { log "no mpsearch python found: set MPSEARCH_PYTHON"; exit 2; }

venv="${XDG_CACHE_HOME:-$HOME/.cache}/mpsearch/peers/mct-${MCT_VERSION}"
py="$venv/bin/python"

check() {  # both imports work in the peers venv
  "$py" - <<'EOF' >&2
import torch, torchvision, model_compression_toolkit as mct
print(f"peers_venv: ok: model_compression_toolkit {mct.__version__}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}")
EOF
}

if [[ -x "$py" ]] && check 2>/dev/null; then
  log "reusing $venv"
  echo "$py"
  exit 0
fi

# the directory holding torch (the dependency venv's site-packages, which mpsearch's .venv adds
# through its own .pth file), and the base interpreter mpsearch runs on
info="$("$MPSEARCH_PYTHON" - <<'EOF' || true
import os, sys, torch
print(sys._base_executable)
print(os.path.dirname(os.path.dirname(torch.__file__)))
EOF
)"
base="$(sed -n 1p <<<"$info")"
deps="$(sed -n 2p <<<"$info")"
[[ -n "${base:-}" && -x "$base" && -d "${deps:-}" ]] || { log "cannot find torch with $MPSEARCH_PYTHON"; exit 2; }
log "mpsearch python $MPSEARCH_PYTHON: base $base, dependencies in $deps"

mkdir -p "$(dirname "$venv")"
if [[ ! -x "$py" ]]; then
  "$base" -m venv "$venv"
fi
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# appended after the venv's own site-packages: what pip installs here wins over the shared copy
echo "import site; site.addsitedir('$deps')" > "$site/_mpsearch_deps.pth"
# the venv's own bundled setuptools would shadow the newer one torch needs (>=77): use the shared one
if [[ -d "$deps/setuptools" && -d "$site/setuptools" ]]; then
  "$py" -m pip uninstall --disable-pip-version-check -y -q setuptools >&2
fi

log "pip install model-compression-toolkit==$MCT_VERSION into $venv"
"$py" -m pip install --disable-pip-version-check -q "model-compression-toolkit==$MCT_VERSION" >&2
check
echo "$py"
