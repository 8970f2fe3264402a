# Stand-in for nvcr.io/nvidia/tritonserver:<yy.mm>-pyt-python-py3: the tritonserver 2.51 build
# bundled in nvidia-pytriton (python backend only, runs on CPU), laid out as in NGC's image
# (/opt/tritonserver/bin, /opt/tritonserver/backends/python), on the stand-in python image,
# which holds torch and numpy as NGC's image does. The context (build.py writes it) holds
# symlinks into that image's site-packages.
ARG PYTHON_IMAGE=persrec-standin/python:3.11
FROM ${PYTHON_IMAGE}
COPY opt/tritonserver/ /opt/tritonserver/
ENV PATH=/opt/tritonserver/bin:/usr/local/bin:/usr/bin:/usr/sbin
WORKDIR /opt/tritonserver
