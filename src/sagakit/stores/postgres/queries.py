"""The PostgreSQL store's SQL files, each read once: the named statements of
``stores/sql/postgres_queries.sql`` and sagakit's migration steps,
``stores/sql/postgres_NNNN_*.sql``; and the parameters of a saga row."""

from __future__ import annotations

from typing import Any

from sagakit.core.instance import SagaInstance
from sagakit.stores.rows import saga_insert_params, saga_update_params
from sagakit.stores.sql import engine_migrations, named_queries


def _queries() -> dict[str, str]:
    return named_queries("postgres")


def _engine_migrations() -> tuple[str, ...]:
    return engine_migrations("postgres")


def _saga_insert_params(i: SagaInstance) -> tuple[Any, ...]:
    return saga_insert_params(i, bool)


def _saga_update_params(i: SagaInstance, expected_version: int) -> tuple[Any, ...]:
    return saga_update_params(i, expected_version, bool)
