# Stand-in for postgres: Debian's PostgreSQL 15 server behind an entrypoint that reads the
# image's POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB / PGDATA (postgres-entrypoint.sh).
ARG ROOTFS
FROM ${ROOTFS}
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/bin:/usr/bin PGDATA=/var/lib/postgresql/data \
    TZ=UTC LANG=C.UTF-8
# uid 999, as in the official image
USER 999:999
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
