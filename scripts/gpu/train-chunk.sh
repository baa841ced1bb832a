#!/usr/bin/env bash
# One chunk of SH-field training on a lent GPU machine (docs/training.md, "Training on a lent
# GPU"): install the carried wheels if the packages are missing, simulate the training slabs
# on every core, train for MINUTES, export the weights in float16 and copy the model folder and
# the training log into RESULTS (the device call's $OUT).
#
#   scripts/gpu/train-chunk.sh CONFIG MINUTES RESULTS [N_SLABS]
#
# CONFIG is an SH-field training config (for example scripts/gpu/field-wide.json); its
# `slabs` folder receives slabs 0 .. N_SLABS - 1 (default 640) of series 0, skipping those
# that exist. Runs on the CPU too (device "auto"), which is how it was tested. $PYTHON names
# the interpreter (default python3).
set -euo pipefail
py=${PYTHON:-python3}
config=$(realpath "$1"); minutes=$2; results=$(realpath -m "$3"); n_slabs=${4:-640}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
mkdir -p "$results"
export PYTHONPATH="$repo/.gpu-data/python:$repo${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c "import dipy, monai, nibabel" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/qid2-site .whl/*.whl
  export PYTHONPATH="/tmp/qid2-site:$PYTHONPATH"
fi
if [ -z "${QID2_PHANTOM_DIR:-}" ] && [ -d .gpu-data/phantom ]; then
  export QID2_PHANTOM_DIR="$repo/.gpu-data/phantom"
fi
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
read -r slabs output name n_val val_seed < <("$py" -c "
import sys
from qid2_bidsapp.model.field_train import FieldTrainConfig
c = FieldTrainConfig.from_file(sys.argv[1])
print(c.slabs, c.output, c.name, c.n_val_slabs, c.val_seed)" "$config")
# simulate slabs FIRST..N-1 of series SEED into FOLDER, one process per core
simulate() {
  local folder=$1 n=$2 seed=$3 workers per first last i
  workers=$(nproc)
  per=$(((n + workers - 1) / workers))
  local pids=()
  for ((i = 0; i < workers; i++)); do
    first=$((i * per)); last=$((first + per < n ? first + per : n))
    if [ "$first" -lt "$last" ]; then
      OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
        "$py" -m qid2_bidsapp.sim.slabs "$folder" "$first" "$last" "$seed" &
      pids+=($!)
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}
start=$SECONDS
simulate "$slabs" "$n_slabs" 0
# the validation slabs the trainer would otherwise make in one process (same series, same names)
simulate "$output/val_slabs" "$n_val" "$val_seed"
echo "slabs: $(find "$slabs" -name 'slab-*.npz' | wc -l) (+ $n_val for validation) in" \
  "$((SECONDS - start)) s"
start=$SECONDS
"$py" -m qid2_bidsapp.model.field_train "$config" "$minutes"
echo "training chunk: $((SECONDS - start)) s"
"$py" -c "import sys; from qid2_bidsapp.cli.train import main; sys.exit(main(sys.argv[1:]))" \
  "$config" --export --export-dtype float16
cp "$output/$name"/* "$output/train_log.jsonl" "$results"/
ls -la "$results"
