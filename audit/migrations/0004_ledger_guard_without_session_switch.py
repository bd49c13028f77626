"""Replace django-pgtrigger's ledger triggers with plain PostgreSQL triggers.

pgtrigger's triggers honour a session switch (``SET pgtrigger.ignore = ...``) that any role
able to run SQL can set, so a role with plain DELETE rights could switch them off and delete
ledger rows. The triggers installed here read no setting: only a role that may ALTER the
table (its owner, a superuser) can disable them, and the application connects as a role that
is neither (``manage.py grant_app_role``). They also cover what pgtrigger's did not:
TRUNCATE, entries that do not chain on the head, and the head itself, which may only move
one step forward, to the entry that was just chained on it.

The SQL is written out here, not imported, so that this migration stays what it was when it
ran. Nothing happens on SQLite, which has no roles to separate.
"""

from django.db import migrations

import pgtrigger.migrations

GENESIS_HASH = "0" * 64
# The columns an entry's hash covers (and its primary key): none may ever change.
IMMUTABLE = (
    "id",
    "seq",
    "prev_hash",
    "entry_hash",
    "event",
    "actor_id_at_write",
    "actor_repr",
    "subject_type",
    "subject_id",
    "consortium_slug",
    "institution_slug",
    "payload_text",
    "created_at",
)


def _install_sql(schema: str) -> str:
    old_row = ", ".join(f'OLD."{c}"' for c in IMMUTABLE)
    new_row = ", ".join(f'NEW."{c}"' for c in IMMUTABLE)
    # search_path is pinned in every function, temporary schema last: a session must not be
    # able to shadow the ledger tables with temporary tables of the same name.
    path = f"SET search_path = \"{schema}\", pg_temp"
    return f"""
CREATE FUNCTION audit_ledger_entry_guard() RETURNS trigger LANGUAGE plpgsql {path} AS $$
DECLARE
    head_seq bigint;
    head_hash varchar(64);
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'ledger: entry #% cannot be deleted: the ledger is append-only', OLD.seq;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Called only for a forbidden change (the trigger's WHEN clause).
        RAISE EXCEPTION 'ledger: entry #% cannot be changed: the only change allowed is '
            'its actor set to NULL when the user is deleted', OLD.seq;
    END IF;
    -- INSERT: the entry must chain on the head, which the same transaction then moves.
    SELECT "seq", "entry_hash" INTO head_seq, head_hash FROM "audit_ledgerhead" WHERE "id" = 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ledger: there is no head row to chain entry #% on', NEW.seq;
    END IF;
    -- The append moves the head in the same statement as it inserts the entry, and PostgreSQL
    -- may run either part first: the head either still names the entry's predecessor, or has
    -- just been moved to this very entry (and its AFTER trigger checks the predecessor then).
    IF NOT ((NEW."seq" = head_seq + 1 AND NEW."prev_hash" = head_hash)
            OR (NEW."seq" = head_seq AND NEW."entry_hash" = head_hash)) THEN
        RAISE EXCEPTION 'ledger: entry #% does not chain on the head (#%): an entry must have '
            'the next sequence number and the head''s hash as its previous hash',
            NEW.seq, head_seq;
    END IF;
    RETURN NEW;
END
$$;

CREATE FUNCTION audit_ledger_no_truncate() RETURNS trigger LANGUAGE plpgsql {path} AS $$
BEGIN
    RAISE EXCEPTION 'ledger: % cannot be truncated: the ledger is append-only', TG_TABLE_NAME;
END
$$;

CREATE FUNCTION audit_ledger_head_guard() RETURNS trigger LANGUAGE plpgsql {path} AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'ledger: the head cannot be deleted';
    ELSIF TG_OP = 'INSERT' THEN
        -- Two first appends may race to create the missing head: the loser must see the
        -- unique violation it would have seen without this trigger (the append retries on it).
        IF EXISTS (SELECT 1 FROM "audit_ledgerhead") THEN
            RAISE EXCEPTION 'ledger: a head row can only be created once'
                USING ERRCODE = 'unique_violation';
        END IF;
        IF NEW."id" <> 1 OR NEW."seq" <> 0 OR NEW."entry_hash" <> '{GENESIS_HASH}' THEN
            RAISE EXCEPTION 'ledger: a head row can only be created empty (#0, genesis)';
        END IF;
        RETURN NEW;
    END IF;
    -- UPDATE: called only for a move that is not one step forward (the trigger's WHEN clause).
    RAISE EXCEPTION 'ledger: the head can only move one step forward (from #% to #%), '
        'not to #%', OLD.seq, OLD.seq + 1, NEW.seq;
END
$$;

-- After the statement, when an entry inserted by the same statement (the append's one
-- INSERT ... UPDATE) is visible: the head must name an entry chained on the old head.
CREATE FUNCTION audit_ledger_head_names_entry() RETURNS trigger LANGUAGE plpgsql {path} AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM "audit_ledgerentry"
        WHERE "seq" = NEW."seq" AND "entry_hash" = NEW."entry_hash"
            AND "prev_hash" = OLD."entry_hash"
    ) THEN
        RAISE EXCEPTION 'ledger: the head cannot move to #% %: no entry with that number and '
            'hash is chained on the previous head', NEW.seq, left(NEW.entry_hash, 12);
    END IF;
    RETURN NULL;
END
$$;

-- The checks that need no other row are WHEN clauses, so that an append, which passes them,
-- calls no function for them: every append pays for these triggers (benchmarks/ledger.py).
CREATE TRIGGER audit_ledger_entry_guard
    BEFORE INSERT OR DELETE ON "audit_ledgerentry"
    FOR EACH ROW EXECUTE FUNCTION audit_ledger_entry_guard();
CREATE TRIGGER audit_ledger_entry_no_change
    BEFORE UPDATE ON "audit_ledgerentry"
    FOR EACH ROW WHEN (ROW({old_row}) IS DISTINCT FROM ROW({new_row}) OR NEW."actor_id" IS NOT NULL)
    EXECUTE FUNCTION audit_ledger_entry_guard();
CREATE TRIGGER audit_ledger_entry_no_truncate
    BEFORE TRUNCATE ON "audit_ledgerentry"
    FOR EACH STATEMENT EXECUTE FUNCTION audit_ledger_no_truncate();
CREATE TRIGGER audit_ledger_head_guard
    BEFORE INSERT OR DELETE ON "audit_ledgerhead"
    FOR EACH ROW EXECUTE FUNCTION audit_ledger_head_guard();
CREATE TRIGGER audit_ledger_head_step
    BEFORE UPDATE ON "audit_ledgerhead"
    FOR EACH ROW WHEN (NEW."id" <> OLD."id" OR NEW."seq" <> OLD."seq" + 1)
    EXECUTE FUNCTION audit_ledger_head_guard();
CREATE TRIGGER audit_ledger_head_names_entry
    AFTER UPDATE ON "audit_ledgerhead"
    FOR EACH ROW EXECUTE FUNCTION audit_ledger_head_names_entry();
CREATE TRIGGER audit_ledger_head_no_truncate
    BEFORE TRUNCATE ON "audit_ledgerhead"
    FOR EACH STATEMENT EXECUTE FUNCTION audit_ledger_no_truncate();
"""


UNINSTALL_SQL = """
DROP TRIGGER IF EXISTS audit_ledger_entry_guard ON "audit_ledgerentry";
DROP TRIGGER IF EXISTS audit_ledger_entry_no_change ON "audit_ledgerentry";
DROP TRIGGER IF EXISTS audit_ledger_entry_no_truncate ON "audit_ledgerentry";
DROP TRIGGER IF EXISTS audit_ledger_head_guard ON "audit_ledgerhead";
DROP TRIGGER IF EXISTS audit_ledger_head_step ON "audit_ledgerhead";
DROP TRIGGER IF EXISTS audit_ledger_head_names_entry ON "audit_ledgerhead";
DROP TRIGGER IF EXISTS audit_ledger_head_no_truncate ON "audit_ledgerhead";
DROP FUNCTION IF EXISTS audit_ledger_entry_guard();
DROP FUNCTION IF EXISTS audit_ledger_no_truncate();
DROP FUNCTION IF EXISTS audit_ledger_head_guard();
DROP FUNCTION IF EXISTS audit_ledger_head_names_entry();
"""


def install(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT current_schema()")
        (schema,) = cursor.fetchone()
        # No parameters: the functions' RAISE formats use "%", which must reach PostgreSQL.
        cursor.execute(_install_sql(schema))


def uninstall(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cursor:
            cursor.execute(UNINSTALL_SQL)


class Migration(migrations.Migration):
    dependencies = [("audit", "0003_ledger_indexes_for_pages")]

    operations = [
        pgtrigger.migrations.RemoveTrigger(model_name="ledgerentry", name="ledger_no_delete"),
        pgtrigger.migrations.RemoveTrigger(model_name="ledgerentry", name="ledger_no_update"),
        migrations.RunPython(install, uninstall),
    ]
