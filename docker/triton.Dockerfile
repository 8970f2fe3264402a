# NVIDIA Triton with persrec installed: the python-backend models that `persrec export` writes
# import persrec.serving.inference.
#
#   docker build -f docker/triton.Dockerfile -t persrec-triton .
#   docker run --gpus all --shm-size=1g -p 8001:8001 -v "$PWD/var/model_repository:/models:ro" \
#       persrec-triton tritonserver --model-repository=/models
#
# 24.12 runs Ubuntu 24.04 with Python 3.12 (persrec needs 3.11 or 3.12; the 24.0x-24.10 images
# have 3.10). The -pyt-python- variant ships PyTorch for the python backend.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.12-pyt-python-py3
FROM ${TRITON_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1

# The models need torch and numpy only, and the image has both: fail here if it does not.
RUN python3 -c "import numpy, torch; print('torch', torch.__version__, 'numpy', numpy.__version__)"

WORKDIR /opt/persrec
COPY pyproject.toml README.md ./
COPY persrec persrec
COPY models models
COPY memory memory
COPY stream stream
COPY serving serving
COPY triton_models triton_models
# --no-deps: Kafka, Faust and the rest belong to the worker, not to Triton, and the image's own
# torch and numpy stay as NVIDIA built them. A model that reads items by their text follows the
# item catalogue in the workers' database (serving/catalogue.py): SQLAlchemy, psycopg and
# pydantic-settings (PERSREC_DATABASE_URL), pinned as in pyproject.toml.
ARG PIP_INSTALL_ARGS=
RUN python3 -m pip install $PIP_INSTALL_ARGS --no-deps . \
    && python3 -m pip install $PIP_INSTALL_ARGS "sqlalchemy>=2.0,<2.2" "psycopg[binary]>=3.1" "pydantic>=2.7" \
       "pydantic-settings>=2.3" \
    && cd / && python3 -c "import persrec.serving.inference, persrec.serving.triton_batch, persrec.serving.catalogue"

WORKDIR /opt/tritonserver
