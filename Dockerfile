# qid2: q-space up-sampling of diffusion MRI, as a BIDS app (docs/containers.md).
#
#   docker build -t qid2:0.1.0 .
#   docker run --rm --gpus all -u "$(id -u):$(id -g)" -v /data:/data:ro -v /out:/out \
#       qid2:0.1.0 /data /out/qid2 participant -w /out/work
#
# BASE_IMAGE: a CUDA PyTorch image (default, pinned), whose torch is used as it is, or any
# Debian/Ubuntu image with python3 (>= 3.11, with venv), on which torch is installed from
# TORCH_REQUIREMENT (+ TORCH_PIP_ARGS, e.g. a CPU wheel index or a folder of wheels).
# scripts/build-container.sh builds it with buildah on a locally made Debian base.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
ARG TORCH_REQUIREMENT="torch>=2.8"
ARG TORCH_PIP_ARGS=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV VIRTUAL_ENV=/opt/qid2 \
    PATH=/opt/qid2/bin:$PATH \
    HOME=/home/qid2 \
    OMP_NUM_THREADS=1 \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    NIPYPE_NO_ET=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    QID2_CONTAINER_TYPE=docker

# A non-root user (uid 1000) whose home any uid may write to (docker run -u "$(id -u)"; caches
# of matplotlib and the BIDS validator go there, or to the user's home under Apptainer), a
# virtual environment that sees the base's packages (a CUDA base's torch is not reinstalled),
# and torch only when the base has none (then without its C++ headers and test binaries: the
# app compiles nothing).
# TORCH_PIP_ARGS is split into words on purpose (several pip options); TORCH_REQUIREMENT is
# pinned by whoever builds (the default only asks for a torch new enough for the model).
# hadolint ignore=SC2086,DL3013
RUN useradd --no-log-init --create-home --uid 1000 --shell /bin/bash qid2 \
    && chmod 0777 /home/qid2 \
    && mkdir -p /opt/templateflow \
    && python3 -m venv --system-site-packages /opt/qid2 \
    && if python -c "import torch" 2>/dev/null; then \
        python -c "import torch; print('torch', torch.__version__, 'from the base image; CUDA', torch.version.cuda)"; \
    else \
        pip install --no-cache-dir ${TORCH_PIP_ARGS} "${TORCH_REQUIREMENT}" \
        && torch_dir=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))") \
        && rm -rf "$torch_dir/include" "$torch_dir/test" "$torch_dir"/bin/test_*; \
    fi

# Dependencies before the code (layer caching): the run-time and `model` requirements,
# read from pyproject.toml; the packages' own test suites (tests/ folders) are dropped.
COPY pyproject.toml /tmp/qid2-deps/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/qid2-deps/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['model']))" \
        > /tmp/qid2-deps/requirements.txt \
    && pip install --no-cache-dir -r /tmp/qid2-deps/requirements.txt \
    && find /opt/qid2/lib -depth -type d -name tests -exec rm -rf {} + \
    && rm -rf /tmp/qid2-deps

# The app, with whatever models/ holds (shipped in the wheel as qid2_bidsapp/_models).
COPY pyproject.toml README.md /tmp/qid2-src/
COPY qid2_bidsapp/ /tmp/qid2-src/qid2_bidsapp/
COPY models/ /tmp/qid2-src/models/
RUN pip install --no-cache-dir --no-deps /tmp/qid2-src \
    && rm -rf /tmp/qid2-src \
    && qid2 --version

# Per-build metadata last, so that a new commit does not invalidate the layers above.
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG IMAGE_TAG=qid2:${VERSION}
LABEL org.opencontainers.image.title="qid2" \
      org.opencontainers.image.description="BIDS app: q-space up-sampling of diffusion MRI with DTI/FA quality control" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/qid2/qid2" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
ENV QID2_CONTAINER_TAG=${IMAGE_TAG}

WORKDIR /home/qid2
# numeric, so that runAsNonRoot-style checks can verify it (the user is qid2)
USER 1000
ENTRYPOINT ["qid2"]
CMD ["--help"]
