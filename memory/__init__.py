"""Per-user long-term memory storage (package `persrec.memory`).

A user's long history is compressed into a small memory tensor (L, 2, M, H, D/H) that is valid
only for the model version that wrote it. `MemoryStore` is the interface; `SqlMemoryStore`
(SQLite or PostgreSQL, after `migrate(url)`) and `InMemoryMemoryStore` implement it.
`SqlCatalogue` keeps the items registered while a model serves (table `item_catalogue`);
`SqlSwitches` the model changes made while the workers run (`model_switch`, `switch_offset`).
This package imports neither torch nor the model, stream or serving packages.
"""

from persrec.memory.catalogue import CatalogueItem, CatalogueSummary, SqlCatalogue, text_sha256
from persrec.memory.codec import decode_history, decode_tensor, encode_history, encode_tensor
from persrec.memory.engine import create_engine_for
from persrec.memory.in_memory import InMemoryMemoryStore
from persrec.memory.migrator import current_revision, downgrade, migrate
from persrec.memory.record import MemoryRecord, MemoryStats, StaleMemoryError
from persrec.memory.schema import Base, UserMemory
from persrec.memory.sql_store import SqlMemoryStore
from persrec.memory.switches import SqlSwitches, SwitchRequest
from persrec.memory.store import MemoryStore

__all__ = [
    "Base",
    "CatalogueItem",
    "CatalogueSummary",
    "InMemoryMemoryStore",
    "MemoryRecord",
    "MemoryStats",
    "MemoryStore",
    "SqlCatalogue",
    "SqlMemoryStore",
    "SqlSwitches",
    "StaleMemoryError",
    "SwitchRequest",
    "UserMemory",
    "create_engine_for",
    "current_revision",
    "decode_history",
    "decode_tensor",
    "downgrade",
    "encode_history",
    "encode_tensor",
    "migrate",
    "text_sha256",
]
