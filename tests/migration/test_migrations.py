"""Each service's migrations: one head, the migrated schema equals the models, and a full
downgrade/upgrade round trip works on a fresh database."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, create_engine, inspect, text

from common.db import alembic_config
from common.migrate import downgrade, upgrade
from ledger.models import metadata as ledger_metadata
from sequencer.models import metadata as sequencer_metadata

ROOT = Path(__file__).resolve().parents[2]
SERVICES: dict[str, MetaData] = {"sequencer": sequencer_metadata, "ledger": ledger_metadata}

# Landed revisions and the versioned SQL they load never change: a change to the schema or to a
# function is a new revision (and a new `name_vN.sql`). A new file is added here with its
# revision, and is frozen from then on.
LANDED = {
    "ledger/migrations/versions/13dbbf6c5aa7_initial_schema.py": (
        "2635d6c62f0927f8b06fcdba43a60aee768ec1350570b605117d6797d1e8f623"
    ),
    "sequencer/migrations/versions/187e90d4b5bb_initial_schema.py": (
        "c081c075c3a6b3dd1a21aca7098dcec1af7ffa881c49790ea11714a44738c6c8"
    ),
    "sequencer/migrations/versions/5c1f0e2a9b7d_server_side_steps.py": (
        "34537da361a8a982bab41061ed71adf2b80d136582d5c93e3c422e8a1ae2547d"
    ),
    "sequencer/migrations/versions/8d3a61c0f4b2_batched_ingress.py": (
        "b948685d16f468112847cefcb843de1c0f151817054aeec729f07a5ce22ab48a"
    ),
    "sequencer/migrations/versions/a4e7c2d91f35_batched_forwarding.py": (
        "1327c8251405cd902340302207851d545e0de88b96145792c9c8391b93878ec7"
    ),
    "sequencer/migrations/versions/b5d2f8e3c1a7_blocked_events.py": (
        "2983007e283fa2c554de53809a04a1fcedf9175e869d2d25f1b00aed6d86f66d"
    ),
    "sequencer/migrations/versions/c7b19e4f2a60_backlog_index.py": (
        "7c6af8f4dfc8c0e3032681c882dc6dd1e7cd1d2b10debe39e1910fd4294b1cb0"
    ),
    "sequencer/migrations/versions/c3b8e1f0a6d2_outbox.py": (
        "df1f29ddb92b6300d58ecf72b5e94e00390f29a12fdf15de60864456b867fe89"
    ),
    "sequencer/migrations/versions/c8e4b1f2a6d3_rejections_index.py": (
        "49b22d47f164873995d1d953bd38ba6ac78ed53c5dcc2edd728642bd9112c55e"
    ),
    "sequencer/migrations/versions/c7e4a9d2b6f1_event_traceparent.py": (
        "f91e11396328927fdf31ea4c9e0a8f5ba4bd7b3b733e42cbca19f0f1d29ed9e3"
    ),
    "sequencer/sql/lock_submissions_v2.sql": "3f8198512585c37e0b9775e685c25869f11b3a74f7062887d2e22b3e250f6b49",
    "sequencer/sql/lock_submissions_v3.sql": "8efaddd0b8ae4c9869a16e685c8ed198b73d548832eebb8edf7105d8de22371b",
    "sequencer/sql/outbox_enqueue_v1.sql": "8f5cd40ce07b1b2f09f8dba75e298c69450bf3467cdbc6714c6fb15b92abd798",
    "sequencer/sql/record_outcomes_v1.sql": "ea3a89fd981423df0e258d920b9e065fac6a6418808e195ceb4d4ca5f6f11cf2",
}


def migration_files() -> list[str]:
    found = [p for service in SERVICES for p in (ROOT / service).glob("migrations/versions/*.py")]
    found += [p for service in SERVICES for p in (ROOT / service).glob("sql/*.sql")]
    return sorted(str(p.relative_to(ROOT)) for p in found)


def test_landed_revisions_are_frozen() -> None:
    assert migration_files() == sorted(LANDED), "freeze each new revision (and SQL file) in LANDED"
    for path, digest in LANDED.items():
        assert hashlib.sha256((ROOT / path).read_bytes()).hexdigest() == digest, f"{path} changed after landing"


@pytest.mark.parametrize("service", SERVICES)
def test_database_functions_equal_their_sql_files(database_url: str, service: str) -> None:
    """Each function in the migrated database is defined exactly as its file in sql/ says."""
    files = sorted((ROOT / service / "sql").glob("*.sql"))
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            for file in files:
                definition = conn.scalar(
                    text("SELECT pg_get_functiondef(to_regproc(:name))"), {"name": f"{service}.{file.stem}"}
                )
                assert definition is not None, f"{service}.{file.stem} is not in the migrated database"
                assert definition.strip() == file.read_text().strip(), f"{file.name} differs from the database"
    finally:
        engine.dispose()


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
