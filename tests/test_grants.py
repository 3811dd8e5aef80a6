"""`outbox grants`: the SQL it prints, checked without a server (tests/test_db_roles.py
applies it to a real database)."""

from __future__ import annotations

import pytest

from outbox.cli import main
from outbox.grants import grants_sql, quote_ident
from outbox.migrate import histories

EMIT = '"s1"."outbox_emit"(text, text, text, jsonb, bigint, text, jsonb)'


def _statements(sql: str) -> list[str]:
    return [line for line in sql.splitlines() if line and not line.startswith("--")]


def test_each_role_gets_what_its_processes_use_and_nothing_of_the_others():
    sql = grants_sql("s1", "app_r", "relay_r", histories(), owner="own_r")
    statements = _statements(sql)
    assert statements[0] == 'GRANT USAGE ON SCHEMA "s1" TO "app_r", "relay_r";'
    app = {s for s in statements if s.endswith('TO "app_r";')}
    relay = {s for s in statements if s.endswith('TO "relay_r";')}
    assert f"GRANT EXECUTE ON FUNCTION {EMIT} TO \"app_r\";" in app
    for table in ("image", "image_event", "result_cache"):
        assert (f'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "s1"."{table}" TO "app_r";'
                in app)
        assert not any(f'"{table}"' in s for s in relay)
    assert 'GRANT SELECT, INSERT ON TABLE "s1"."processed_event" TO "app_r";' in app
    assert not any('"outbox"' in s or '"relay_slot"' in s for s in app)  # emits by function
    assert relay >= {
        'GRANT SELECT, UPDATE (published_at), DELETE ON TABLE "s1"."outbox" TO "relay_r";',
        'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "s1"."relay_slot" TO "relay_r";',
        'GRANT SELECT, DELETE ON TABLE "s1"."processed_event" TO "relay_r";',
        'GRANT SELECT ON TABLE "s1"."outbox_config" TO "relay_r";',
    }
    for h in histories():  # every process may check the schema's revision
        for role in ("app_r", "relay_r"):
            assert f'GRANT SELECT ON TABLE "s1"."{h.version_table}" TO "{role}";' in statements
    assert ('ALTER DEFAULT PRIVILEGES FOR ROLE "own_r" IN SCHEMA "s1" GRANT SELECT, INSERT, '
            'UPDATE, DELETE ON TABLES TO "app_r";') in statements
    assert ('ALTER DEFAULT PRIVILEGES FOR ROLE "own_r" IN SCHEMA "s1" GRANT USAGE, SELECT ON '
            'SEQUENCES TO "app_r";') in statements
    # REPLICATION needs a superuser: a comment, never a statement the owner would fail on.
    assert "-- ALTER ROLE \"relay_r\" WITH REPLICATION;" in sql.splitlines()
    assert not any("REPLICATION" in s for s in statements)
    assert all(s.startswith(("GRANT ", "ALTER DEFAULT PRIVILEGES ")) for s in statements)
    assert all(s.endswith(";") for s in statements)


def test_without_an_owner_default_privileges_are_those_of_the_role_running_them():
    statements = _statements(grants_sql("s1", "a", "r", histories()))
    defaults = [s for s in statements if s.startswith("ALTER DEFAULT PRIVILEGES")]
    assert defaults and all(s.startswith('ALTER DEFAULT PRIVILEGES IN SCHEMA "s1" ')
                            for s in defaults)


def test_role_names_are_quoted_and_refused_when_shared_or_the_schema_is_not_plain():
    assert quote_ident('we"ird Role') == '"we""ird Role"'
    assert 'TO "we""ird Role";' in grants_sql("s1", 'we"ird Role', "r", histories())
    with pytest.raises(ValueError, match="must be different roles"):
        grants_sql("s1", "same", "same", histories())
    with pytest.raises(ValueError, match="invalid schema name"):
        grants_sql('s1"; drop table x; --', "a", "r", histories())


def test_the_command_prints_the_sql_and_refuses_a_shared_role(capsys):
    assert main(["grants", "--app", "a", "--relay", "r", "--owner", "o", "--schema", "s1"]) == 0
    out = capsys.readouterr().out
    assert out == grants_sql("s1", "a", "r", histories(), owner="o")
    assert main(["grants", "--app", "a", "--relay", "a", "--schema", "s1"]) == 2
    err = capsys.readouterr().err
    assert "outbox grants:" in err and "must be different roles" in err
