#!/usr/bin/env bash
# Put beside the checkout what one SH-field training chunk on a lent GPU machine needs and the
# machine lacks (docs/training.md, "Training on a lent GPU"). Run here, in the repository:
#
#   scripts/gpu/prepare.sh
#
# - .whl/: Python 3.12 wheels of dipy, monai, nibabel, trx-python (the device image has torch,
#   numpy, scipy, h5py, safetensors, tqdm but not these);
# - .gpu-data/phantom/: the simulator's driver files (../shared/data/phantom, see its README);
# - .gpu-data/python/nilearn/: the two MNI152 tissue maps the simulator reads from nilearn's
#   data folder, under a stub package of that name (the nilearn wheel itself is 10 MB).
# Both folders are git-ignored; name them in the device call's `carry`. Prints their sizes:
# with the tracked files they must stay under the 64 MiB a call may carry.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
phantom=${QID2_PHANTOM_DIR:-$repo/../shared/data/phantom}
rm -rf .whl .gpu-data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  dipy==1.12.1 monai==1.6.1 nibabel==5.4.2 trx-python==0.6
mkdir -p .gpu-data/phantom .gpu-data/python/nilearn/datasets/data
for f in subject_2.5mm_peaks.nii.gz subject_2.5mm_FA.nii.gz subject_2.5mm_nodif_brain_mask.nii.gz LICENSE; do
  cp "$phantom/$f" .gpu-data/phantom/
done
nilearn_data=$(python3 -c "import nilearn, pathlib; print(pathlib.Path(nilearn.__file__).parent / 'datasets' / 'data')")
cp "$nilearn_data"/mni_icbm152_{gm,wm}_tal_nlin_sym_09a_converted.nii.gz \
  .gpu-data/python/nilearn/datasets/data/
echo '"""Stub: only the MNI152 tissue maps that qid2_bidsapp.sim.anatomy reads (device use)."""' \
  > .gpu-data/python/nilearn/__init__.py
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
extra=$(du -cb .whl .gpu-data | tail -1 | cut -f1)
echo "tracked files $((tracked / 1048576)) MiB + .whl and .gpu-data $((extra / 1048576)) MiB" \
  "= $(((tracked + extra) / 1048576)) MiB of the 64 MiB a device call carries"
