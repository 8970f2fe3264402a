"""Alembic environment, driven by `persrec.memory.migrate` (there is no alembic.ini).

The caller puts an open SQLAlchemy connection in `config.attributes["connection"]`; the
migration runs inside that connection's transaction. Offline (SQL script) mode uses the URL in
the `sqlalchemy.url` option.
"""

from alembic import context

from persrec.memory.schema import Base

config = context.config
OPTIONS = {
    "target_metadata": Base.metadata,
    "compare_type": True,
    # SQLite cannot ALTER most things; batch mode rebuilds the table in later revisions.
    "render_as_batch": True,
}


def run_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes["connection"]
    context.configure(connection=connection, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
