"""Alembic migrations of the memory store's schema; run them with `persrec.memory.migrate`."""
