"""Each service's migrations: one head, the migrated schema equals the models, and a full
downgrade/upgrade round trip works on a fresh database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, create_engine, inspect

from common.db import alembic_config
from common.migrate import downgrade, upgrade
from ledger.models import metadata as ledger_metadata
from sequencer.models import metadata as sequencer_metadata

ROOT = Path(__file__).resolve().parents[2]
SERVICES: dict[str, MetaData] = {"sequencer": sequencer_metadata, "ledger": ledger_metadata}


@pytest.mark.parametrize("service", SERVICES)
def test_single_head(service: str) -> None:
    script = ScriptDirectory.from_config(alembic_config(ROOT / service / "migrations", "", service))
    assert len(script.get_heads()) == 1


def schema_diff(url: str, service: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "include_schemas": True,
                    "include_name": lambda name, type_, _p: (
                        (type_ != "schema" or name == service) and not (type_ == "table" and name == "alembic_version")
                    ),
                    "compare_server_default": True,
                },
            )
            return list(compare_metadata(context, SERVICES[service]))
    finally:
        engine.dispose()


@pytest.mark.parametrize("service", SERVICES)
def test_upgrade_matches_models_and_round_trips(empty_database_url: str, service: str) -> None:
    migrations = ROOT / service / "migrations"
    upgrade(migrations, empty_database_url, service)
    assert schema_diff(empty_database_url, service) == []
    downgrade(migrations, empty_database_url, service, "base")
    engine = create_engine(empty_database_url)
    try:
        with engine.connect() as conn:
            assert inspect(conn).get_table_names(schema=service) == ["alembic_version"]
    finally:
        engine.dispose()
    upgrade(migrations, empty_database_url, service)
    assert schema_diff(empty_database_url, service) == []


async def test_server_refuses_an_unmigrated_database(empty_database_url: str) -> None:
    from common.db import NotMigrated
    from sequencer.config import Settings
    from sequencer.server import build_server

    settings = Settings(database_url=empty_database_url, listen_addr="127.0.0.1:0", metrics_addr="127.0.0.1:0")
    with pytest.raises(NotMigrated, match="make migrate"):
        await build_server(settings)
