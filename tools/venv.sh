#!/usr/bin/env bash
# Create or reuse this clone's .venv: a small venv of its own, on top of a shared dependency venv.
#
# Two layers, so that every clone runs its own code and no clone can break another:
#   - the dependency venv, ${MPSEARCH_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/mpsearch/venvs}/<key>, holds
#     every third-party package (torch, optuna, ...) and never mpsearch itself. <key> hashes constraints.txt,
#     the dependency tables of pyproject.toml and the Python version, so clones with the same dependencies
#     share one; it is built once (a few minutes: torch is large) and never modified afterwards.
#   - ./.venv is a real directory of this clone (a few hundred KB): its site-packages holds a .pth file that
#     adds the dependency venv's site-packages, and the editable install of THIS clone; its bin/ holds the
#     dependency venv's scripts (pytest, ray, mlflow, ruff, ...) with their first line pointing at this
#     clone's .venv/bin/python, so `ray start` or `mlflow server` started from here import this clone's code.
# Building .venv takes seconds; deleting a clone deletes only its .venv.
#
# Env: PYTHON (default python3), MPSEARCH_VENV_ROOT, XDG_CACHE_HOME.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
EXTRAS="dev,ray,nlp"
KEEP=2                       # dependency venvs kept in the root after a build (the new one included)
MARKER=".mpsearch-complete"  # in a dependency venv: it is complete
OWN=".mpsearch-clone-venv"   # in ./.venv: made by this script; holds the dependency venv's path

log() { echo "mpsearch: $*" >&2; }
die() { log "error: $*"; exit 1; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# A link left by the earlier layout (.venv -> a shared venv): replace it with a venv of this clone.
if [[ -L .venv ]]; then
    rm -f .venv
fi
# A user's own venv (a directory this script did not make): leave it alone and use it as is.
if [[ -d .venv && ! -f .venv/$OWN ]]; then
    [[ -x .venv/bin/python ]] || die ".venv is a directory without bin/python; remove it or fix it"
    log "using your own venv at $repo/.venv (not made by tools/venv.sh)"
    exit 0
fi

command -v "$PYTHON" >/dev/null || die "python interpreter '$PYTHON' not found (set PYTHON=...)"
command -v flock >/dev/null || die "flock not found (util-linux)"

# --- the dependency venv's key and requirements ------------------------------------------------------------
requirements="$("$PYTHON" - "$EXTRAS" <<'EOF'
import sys, tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
reqs = list(project.get("dependencies", []))
for extra in sys.argv[1].split(","):
    reqs += project.get("optional-dependencies", {})[extra]
print("\n".join(sorted(set(reqs))))
EOF
)"
key="$( { cat constraints.txt; printf '%s\n' "$requirements"; "$PYTHON" --version 2>&1; } \
        | sha256sum | cut -c1-16)"

root="${MPSEARCH_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/mpsearch/venvs}"
mkdir -p "$root"
root="$(cd "$root" && pwd)"
deps="$root/$key"
lock="$root/.$key.lock"
buildlog="$root/.$key.log"

# --- build or reuse the dependency venv (under an exclusive per-key lock) ----------------------------------
exec 9>"$lock"
if ! flock -n 9; then
    log "another run is building $deps; waiting for it ..."
    flock -w 3600 9 || die "timed out waiting for lock $lock"
fi
built=0
if [[ -f "$deps/$MARKER" ]] && "$deps/bin/python" -c "" 2>/dev/null; then
    touch "$deps/$MARKER"            # marker mtime = last use; pruning keeps the most recently used
else
    if [[ -e "$deps" ]]; then
        log "removing incomplete dependency venv $deps"
        rm -rf "$deps"
    fi
    log "building the dependency venv $deps (once for these dependencies, ~3 min; log: $buildlog)"
    start=$SECONDS
    if ! {
        "$PYTHON" -m venv "$deps" &&
        "$deps/bin/python" -m pip install --upgrade --progress-bar off pip setuptools wheel &&
        printf '%s\n' "$requirements" >"$deps/requirements.txt" &&
        "$deps/bin/python" -m pip install --progress-bar off -c constraints.txt -r "$deps/requirements.txt"
    } >"$buildlog" 2>&1; then
        tail -n 40 "$buildlog" >&2 || true
        rm -rf "$deps"
        die "dependency venv build failed (full log: $buildlog)"
    fi
    date -u +%Y-%m-%dT%H:%M:%SZ >"$deps/$MARKER"
    built=1
    log "dependency venv built in $((SECONDS - start))s ($(du -sh "$deps" 2>/dev/null | cut -f1))"
fi
# Readers hold the lock shared while they build on it, so that pruning never removes it under them.
flock -s 9

# --- this clone's .venv ------------------------------------------------------------------------------------
deps_site="$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
here="$(.venv/bin/python -c 'import mpsearch, os; print(os.path.dirname(os.path.dirname(mpsearch.__file__)))' \
        2>/dev/null || true)"
if [[ -f .venv/$OWN && "$(cat .venv/$OWN)" == "$deps" && "$here" == "$repo" ]]; then
    log "reusing .venv (dependencies: $deps)"
else
    start=$SECONDS
    rm -rf .venv
    "$PYTHON" -m venv --without-pip .venv
    site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # addsitedir (not a bare path) so that the .pth files of the dependencies are processed too.
    printf 'import site; site.addsitedir(%s)\n' "$("$PYTHON" -c 'import sys; print(repr(sys.argv[1]))' "$deps_site")" \
        >"$site/_mpsearch_deps.pth"
    # The dependencies' scripts, run by this clone's interpreter.
    for script in "$deps"/bin/*; do
        name="$(basename "$script")"
        [[ -f "$script" && ! -e ".venv/bin/$name" ]] || continue
        case "$name" in activate*|python*|Activate.ps1) continue ;; esac
        if [[ "$(head -c 2 "$script")" == "#!" ]] && head -n 1 "$script" | grep -q "^#!$deps/bin/python"; then
            { echo "#!$repo/.venv/bin/python"; tail -n +2 "$script"; } >".venv/bin/$name"
            chmod +x ".venv/bin/$name"
        elif [[ -x "$script" && "$(head -c 2 "$script")" != "#!" ]]; then
            ln -s "$script" ".venv/bin/$name"       # a compiled program (ruff): nothing to re-point
        fi
    done
    # pip comes from the dependency venv; it installs into this interpreter's prefix, i.e. .venv.
    if ! out="$(.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1)"; then
        printf '%s\n' "$out" >&2
        die "editable install of $repo into .venv failed"
    fi
    echo "$deps" >".venv/$OWN"
    log ".venv made in $((SECONDS - start))s (dependencies: $deps)"
fi
flock -u 9
exec 9>&-

# --- prune old dependency venvs (only after a build, never one in use) -------------------------------------
if [[ $built == 1 ]]; then
    kept=1                           # the venv just built
    # Newest first by marker mtime (= last use); incomplete dirs (no marker) sort last.
    while IFS= read -r dir; do
        [[ "$dir" == "$deps" ]] && continue
        other_key="$(basename "$dir")"
        if [[ -f "$dir/$MARKER" && $kept -lt $KEEP ]]; then
            kept=$((kept + 1))
            continue
        fi
        # Skip a venv that another run is building or setting up a clone on right now. (Lock files are left
        # in place: deleting one would let two runs lock different inodes.)
        exec 8>"$root/.$other_key.lock"
        if flock -n 8; then
            log "pruning old dependency venv $dir (a clone still on it rebuilds its .venv at its next make)"
            rm -rf "$dir" "$root/.$other_key.log"
            flock -u 8
        fi
        exec 8>&-
    done < <(
        for d in "$root"/*/; do
            [[ -d "$d" ]] || continue
            d="${d%/}"
            if [[ -f "$d/$MARKER" ]]; then m="$(stat -c %Y "$d/$MARKER")"; else m=0; fi
            printf '%s\t%s\n' "$m" "$d"
        done | sort -rn -k1,1 | cut -f2-
    )
fi
