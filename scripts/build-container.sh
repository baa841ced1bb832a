#!/usr/bin/env bash
# Build the qid2 image with buildah (no Docker engine needed) and smoke-test it inside.
#
#   scripts/build-container.sh [--tag TAG] [--base IMAGE] [--ca-bundle FILE]
#                              [--torch-wheels DIR] [--oci-archive FILE] [--keep-output DIR]
#                              [--no-cache] [--no-smoke]
#
# Without --base, a Debian bookworm + python3 base is made locally with
# ../shared/tools/container/make-local-base-image (once; reused while the tag exists), since
# base images cannot be pulled here; torch then comes from a local CPU wheel (--torch-wheels,
# default /opt/wheels when it holds one). --ca-bundle FILE mounts FILE as the build's CA bundle
# (for downloads through a TLS-intercepting proxy). The smoke test runs, inside the image:
# `qid2 --version`, the bundled example with the sh engine (outputs checked on the host), and
# the qid2 engine's preflight (finds models/qid2-default when the repo has one, else stops
# with its one-line error and writes nothing). Prints the image size and the times.
# Exits non-zero on any failure. See docs/containers.md.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$repo/qid2_bidsapp/__init__.py")
tag="localhost/qid2:$version"
base=""
base_tag="localhost/qid2-base:bookworm"
ca_bundle=""
torch_wheels=""
oci_archive=""
keep_output=""
no_cache=()
smoke=1

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "build-container: error: $*" >&2; exit 1; }

while (($#)); do
    case $1 in
        --tag) tag=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --ca-bundle) ca_bundle=$2; shift 2 ;;
        --torch-wheels) torch_wheels=$2; shift 2 ;;
        --oci-archive) oci_archive=$2; shift 2 ;;
        --keep-output) keep_output=$2; shift 2 ;;
        --no-cache) no_cache=(--no-cache); shift ;;
        --no-smoke) smoke=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ -n $version ]] || die "cannot read __version__ from $repo/qid2_bidsapp/__init__.py"
[[ -z $ca_bundle || -f $ca_bundle ]] || die "--ca-bundle $ca_bundle: no such file"

t_start=$SECONDS
step() { echo "== build-container: $* ($((SECONDS - t_start)) s)"; }

# ---------------------------------------------------------------- tools
if ! command -v buildah >/dev/null; then
    step "installing buildah and podman (apt)"
    [[ $(id -u) == 0 ]] || die "buildah is not installed (apt-get install buildah podman, as root)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq buildah podman >/dev/null
fi

# ---------------------------------------------------------------- base image
if [[ -z $base ]]; then
    base=$base_tag
    if buildah inspect --type image "$base" >/dev/null 2>&1; then
        step "local base $base exists (reused)"
    else
        maker="$repo/../shared/tools/container/make-local-base-image"
        [[ -x $maker ]] || die "no --base given and $maker is missing"
        step "making the local base $base (debootstrap)"
        "$maker" "$base"
    fi
    if [[ -z $torch_wheels ]] && compgen -G "/opt/wheels/torch-*.whl" >/dev/null; then
        torch_wheels=/opt/wheels
    fi
fi

# ---------------------------------------------------------------- build
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
if [[ $revision != unknown ]] && ! git -C "$repo" diff --quiet HEAD -- 2>/dev/null; then
    revision+="-dirty" # the context holds uncommitted changes
fi
build_args=(
    --build-arg "BASE_IMAGE=$base"
    --build-arg "VERSION=$version"
    --build-arg "VCS_REF=$revision"
    --build-arg "IMAGE_TAG=$tag"
)
mounts=()
if [[ -n $ca_bundle ]]; then
    mounts+=(-v "$(realpath "$ca_bundle"):/etc/ssl/certs/ca-certificates.crt:ro")
fi
if [[ -n $torch_wheels ]]; then
    wheel=$(compgen -G "$torch_wheels/torch-*.whl" | sort | tail -n 1) \
        || die "--torch-wheels $torch_wheels holds no torch-*.whl"
    torch_version=$(basename "$wheel" | cut -d- -f2)
    echo "build-container: torch from $wheel (used only if the base has no torch)"
    mounts+=(-v "$(realpath "$torch_wheels"):/wheels:ro")
    build_args+=(
        --build-arg "TORCH_REQUIREMENT=torch==$torch_version"
        --build-arg "TORCH_PIP_ARGS=--find-links /wheels"
    )
fi
old_id=$(buildah images --noheading --format '{{.ID}}' "$tag" 2>/dev/null | head -n 1 || true)
step "building $tag on $base"
t_build=$SECONDS
buildah bud --isolation chroot --layers "${no_cache[@]}" -f "$repo/Dockerfile" -t "$tag" \
    "${build_args[@]}" "${mounts[@]}" "$repo"
build_s=$((SECONDS - t_build))

new_id=$(buildah images --noheading --format '{{.ID}}' "$tag" | head -n 1)
if [[ -n $old_id && $old_id != "$new_id" ]]; then # the image this build replaces: free its disk
    buildah rmi "$old_id" >/dev/null 2>&1 || true
fi
size_bytes=$(podman image inspect --format '{{.Size}}' "$tag")
size_human=$(buildah images --format '{{.Size}}' "$tag" | head -n 1)

# ---------------------------------------------------------------- smoke test
smoke_s=0
if ((smoke)); then
    t_smoke=$SECONDS
    ctr=$(buildah from --name "qid2-smoke-$$" "$tag")
    ctr_example=$(buildah from --name "qid2-smoke-example-$$" "$tag") # a fresh one, as docker run
    out=${keep_output:-$(mktemp -d)}
    mkdir -p "$out"
    chmod 0777 "$out" # the image runs as uid 1000
    cleanup() {
        buildah rm "$ctr" "$ctr_example" >/dev/null 2>&1 || true
        [[ -n $keep_output ]] || rm -rf "$out"
    }
    trap cleanup EXIT
    inside() { buildah run --isolation chroot -v "$out:/out" "$ctr" -- "$@"; }
    # the example runs with no network (a fresh network namespace) and as an arbitrary uid
    # (docker run -u "$(id -u):$(id -g)"), as on a cluster node
    offline=()
    if unshare --net true 2>/dev/null; then
        offline=(unshare --net)
    else
        echo "build-container: warning: cannot unshare the network; the example runs online"
    fi

    step "smoke: qid2 --version"
    got=$(inside qid2 --version)
    [[ $got == "qid2 $version" ]] || die "qid2 --version printed '$got', expected 'qid2 $version'"
    uid=$(inside id -u)
    [[ $uid != 0 ]] || die "the image runs as root"
    echo "$got (uid $uid)"
    inside python -c "
import einops, monai, safetensors, torch
# a seeded, well-conditioned matrix: an unseeded randn(64, 64) is near-singular now and then,
# and its inverse then misses the identity by more than any tolerance (CI failed on that once)
torch.manual_seed(0)
x = torch.randn(64, 64) + 16 * torch.eye(64)
err = (x @ torch.linalg.inv(x) - torch.eye(64)).abs().max().item()
assert err < 1e-4, f'torch linear algebra is broken in the image: |x inv(x) - I| = {err:.3g}'
print('torch', torch.__version__, '| CUDA build', torch.version.cuda,
      '| GPU visible', torch.cuda.is_available(), '| MONAI', monai.__version__)
"

    step "smoke: qid2-example --engine sh (${offline[*]:-online}, uid 4321)"
    "${offline[@]}" buildah run --isolation chroot --user 4321:4321 -v "$out:/out" "$ctr_example" \
        -- qid2-example /out/example --engine sh
    deriv="$out/example/derivatives/qid2"
    for f in dataset_description.json sub-01.html group.html group_qc.tsv; do
        [[ -s $deriv/$f ]] || die "the example did not write $deriv/$f"
    done
    n_dwi=$(find "$deriv" -name '*_dwi.nii.gz' | wc -l)
    ((n_dwi > 0)) || die "the example wrote no *_dwi.nii.gz under $deriv"
    python3 - "$deriv/dataset_description.json" "$tag" <<'EOF' || die "dataset_description.json does not record the container"
import json, sys
desc = json.load(open(sys.argv[1]))
container = desc["GeneratedBy"][0].get("Container", {})
assert container == {"Type": "docker", "Tag": sys.argv[2]}, container
print("GeneratedBy.Container:", container)
EOF
    echo "example: $n_dwi up-sampled DWI file(s), reports and group table written"

    step "smoke: qid2 engine preflight"
    if [[ -f $repo/models/qid2-default/model.safetensors ]]; then
        inside python -c "
from qid2_bidsapp.engines.base import get_engine
from qid2_bidsapp.engines.qid2 import default_model_dir
engine = get_engine('qid2')
print('qid2 engine ready: model', default_model_dir())
"
    else
        set +e
        msg=$(inside qid2 /out/example/bids /out/qid2-engine participant --engine qid2 2>&1)
        rc=$?
        set -e
        [[ $rc == 1 && $msg == *"cannot run"* && ! -e $out/qid2-engine ]] \
            || die "without a default model, --engine qid2 should stop with one line (rc $rc): $msg"
        echo "no models/qid2-default in this checkout: --engine qid2 stops as designed: $msg"
    fi
    smoke_s=$((SECONDS - t_smoke))
fi

# ---------------------------------------------------------------- OCI archive (Apptainer)
if [[ -n $oci_archive ]]; then
    step "exporting $oci_archive"
    rm -f "$oci_archive"
    buildah push "$tag" "oci-archive:$oci_archive:$tag"
    echo "OCI archive: $oci_archive ($(du -h "$oci_archive" | cut -f1))"
fi

echo "build-container: OK: $tag, $size_human ($size_bytes bytes) uncompressed;" \
    "build ${build_s} s, smoke ${smoke_s} s, total $((SECONDS - t_start)) s"
