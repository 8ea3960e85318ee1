#!/usr/bin/env bash
# Create or reuse the project venv (cached outside the clone) and point ./.venv at it.
#
# The venv lives in ${MPSEARCH_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/mpsearch/venvs}/<key>, where <key>
# hashes constraints.txt, the dependency tables of pyproject.toml and the Python version. Any clone with the
# same dependencies reuses it; only the editable install of mpsearch is re-pointed at the current clone.
#
# Env: PYTHON (default python3), MPSEARCH_VENV_ROOT, XDG_CACHE_HOME.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
EXTRAS="dev,ray,nlp"
KEEP=2                       # venvs kept in the root after a build (the new one included)
MARKER=".mpsearch-complete"

log() { echo "mpsearch: $*" >&2; }
die() { log "error: $*"; exit 1; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# A user's own venv (a real directory, not our link): leave it alone and use it as is.
if [[ -d .venv && ! -L .venv ]]; then
    [[ -x .venv/bin/python ]] || die ".venv is a directory without bin/python; remove it or fix it"
    log "using your own venv at $repo/.venv (a real directory, not managed by tools/venv.sh)"
    exit 0
fi

command -v "$PYTHON" >/dev/null || die "python interpreter '$PYTHON' not found (set PYTHON=...)"
command -v flock >/dev/null || die "flock not found (util-linux)"

# --- cache key --------------------------------------------------------------------------------------------
deps_json="$("$PYTHON" - <<'EOF'
import json, tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f).get("project", {})
print(json.dumps({"dependencies": project.get("dependencies", []),
                  "optional-dependencies": project.get("optional-dependencies", {})},
                 sort_keys=True))
EOF
)"
key="$( { cat constraints.txt; printf '%s\n' "$deps_json"; "$PYTHON" --version 2>&1; } \
        | sha256sum | cut -c1-16)"

root="${MPSEARCH_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/mpsearch/venvs}"
mkdir -p "$root"
root="$(cd "$root" && pwd)"          # absolute: .venv is a symlink to it
venv="$root/$key"
lock="$root/.$key.lock"
buildlog="$root/.$key.log"

# --- build or reuse (under an exclusive per-key lock) -------------------------------------------------
exec 9>"$lock"
if ! flock -n 9; then
    log "another run is building/updating $venv; waiting for it ..."
    flock -w 3600 9 || die "timed out waiting for lock $lock"
fi

built=0
if [[ -f "$venv/$MARKER" ]] && "$venv/bin/python" -c "" 2>/dev/null; then
    log "reusing venv $venv"
    touch "$venv/$MARKER"            # marker mtime = last use; pruning keeps the most recently used
else
    if [[ -e "$venv" ]]; then
        log "removing incomplete venv $venv"
        rm -rf "$venv"
    fi
    log "building venv in $venv (one time, ~3 min; log: $buildlog)"
    start=$SECONDS
    if ! {
        "$PYTHON" -m venv "$venv" &&
        "$venv/bin/python" -m pip install --upgrade --progress-bar off pip setuptools wheel &&
        "$venv/bin/python" -m pip install --progress-bar off -c constraints.txt -e ".[$EXTRAS]"
    } >"$buildlog" 2>&1; then
        tail -n 40 "$buildlog" >&2 || true
        rm -rf "$venv"
        die "venv build failed (full log: $buildlog)"
    fi
    date -u +%Y-%m-%dT%H:%M:%SZ >"$venv/$MARKER"
    built=1
    log "venv built in $((SECONDS - start))s ($(du -sh "$venv" 2>/dev/null | cut -f1))"
fi

# Point ./.venv at the cached venv and the editable install at THIS clone (another clone may have moved it).
ln -sfn "$venv" .venv
# Output is shown only on failure (setuptools' deprecation warnings are noise here).
if ! out="$(.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1)"; then
    printf '%s\n' "$out" >&2
    die "editable install of $repo into $venv failed"
fi
flock -u 9
exec 9>&-

# --- prune old venvs (only after a build) --------------------------------------------------------------
if [[ $built == 1 ]]; then
    kept=1                           # the venv just built
    # Newest first by marker mtime (= last use); incomplete dirs (no marker) sort last.
    while IFS= read -r dir; do
        [[ "$dir" == "$venv" ]] && continue
        other_key="$(basename "$dir")"
        if [[ -f "$dir/$MARKER" && $kept -lt $KEEP ]]; then
            kept=$((kept + 1))
            continue
        fi
        # Skip a venv that another run is building or re-pointing right now. (Lock files are left in place:
        # deleting one would let two runs lock different inodes.)
        exec 8>"$root/.$other_key.lock"
        if flock -n 8; then
            log "pruning old venv $dir"
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
