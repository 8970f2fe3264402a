# Stand-in for python:3.11-slim: this machine's CPython 3.11 in /usr/local with the third-party
# packages of the project's .venv (torch CPU included) in its site-packages, so that images
# built FROM it install nothing from a registry. ROOTFS is the tree build.py imports.
ARG ROOTFS
FROM ${ROOTFS}
RUN ["/usr/sbin/ldconfig"]
ENV PATH=/usr/local/bin:/usr/bin:/usr/sbin LANG=C.UTF-8
CMD ["python3"]
