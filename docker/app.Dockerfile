# persrec's own image: the stream worker, the status API and `persrec export`. CPU only: the
# model runs in Triton; the worker loads a checkpoint only for its config and item id map.
#
#   docker build -f docker/app.Dockerfile -t persrec-app .
#   docker run --rm -e PERSREC_KAFKA_BOOTSTRAP=... persrec-app worker
#
# Configured by PERSREC_* variables (persrec/settings.py). The commands are those of the
# `persrec` CLI: worker (default), api, export CHECKPOINT --out DIR, replay FILE.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned, from the CPU index: a bare torch requirement from PyPI pulls a CUDA build
# of several GB that this image never uses.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"

WORKDIR /opt/persrec
COPY pyproject.toml README.md ./
COPY persrec persrec
COPY models models
COPY memory memory
COPY stream stream
COPY serving serving
COPY triton_models triton_models
# Editable: `persrec export` reads the Triton model templates from triton_models/ beside the
# sources (serving/export.py), and a wheel does not carry them. PIP_INSTALL_ARGS lets an
# offline build add --no-index --no-build-isolation.
ARG PIP_INSTALL_ARGS=
RUN pip install $PIP_INSTALL_ARGS -e .

ENV PERSREC_WORK_DIR=/var/lib/persrec PERSREC_MODEL_REPOSITORY=/models PERSREC_API_HOST=0.0.0.0
WORKDIR /var/lib/persrec
EXPOSE 8080
ENTRYPOINT ["persrec"]
CMD ["worker"]
