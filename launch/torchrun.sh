#!/bin/bash
# Single-node launch: N processes of the trainer with a config and overrides.
#
#   launch/torchrun.sh N configs/X.yaml [section.key=value ...]
#
# Runs `python -m torch.distributed.run --standalone --nproc-per-node N -m pretrain.train
# --config X [overrides]` with the repository's venv (.venv/bin/python, or $PYTHON). --standalone
# hosts the c10d rendezvous on this machine on a free port. ROSETTA_MODULE replaces pretrain.train
# (another entry point taking the same --config and overrides). Mistakes give one line on stderr
# and exit 2; otherwise the exit code is torchrun's.
set -euo pipefail

die() {
    echo "error: $*" >&2
    exit 2
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
MODULE=${ROSETTA_MODULE:-pretrain.train}

[ $# -ge 2 ] || die "usage: launch/torchrun.sh N CONFIG.yaml [section.key=value ...]"
NPROC=$1
CONFIG=$2
shift 2
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "N ('$NPROC') must be a positive integer"
[ -f "$CONFIG" ] || die "config file '$CONFIG' does not exist"
[ -x "$PY" ] || die "python '$PY' not found: run 'make setup' or set PYTHON"
for override in "$@"; do
    [[ $override == *=* ]] || die "override '$override' must have the form section.key=value"
done

exec "$PY" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" \
    -m "$MODULE" --config "$CONFIG" "$@"
