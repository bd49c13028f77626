"""Two PostgreSQL roles: the owner migrates, the application only appends to the ledger.

The ledger's triggers (audit migration 0004) refuse UPDATE, DELETE and TRUNCATE of entries,
entries that do not chain on the head, and any move of the head but one step forward. A
trigger protects only against roles that cannot switch it off, and the table's owner (or a
superuser) can: ``ALTER TABLE ... DISABLE TRIGGER``, ``DROP TRIGGER``. So the server, the
coordinator and beat connect as an *application role* that owns nothing, and a separate
*owner role* runs ``migrate``. :func:`grant_app_role`, run as the owner after every migration,
gives the application role what it needs and no more: every DML right on the other tables,
only SELECT and INSERT on ledger entries (and UPDATE of ``actor_id`` alone: Django nulls it
when a user is deleted), SELECT and UPDATE on the head. It refuses a role that is a
superuser, owns a table, or may act as the owner, because then the triggers would be a
formality. Rewriting history with the owner's rights remains possible; that is what the
sites' witnessed checkpoints catch, not the database.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import transaction
from django.db.backends.base.base import BaseDatabaseWrapper

LEDGER_ENTRY_TABLE = "audit_ledgerentry"
LEDGER_HEAD_TABLE = "audit_ledgerhead"


class RoleSetupError(Exception):
    """The role cannot be made the application's role; the message says why."""


@dataclass(frozen=True)
class Grant:
    """What :func:`grant_app_role` did: the role, the tables it reaches, the ledger's rights."""

    role: str
    owner: str
    schema: str
    tables: int
    ledger_rights: str


def _quote(connection: BaseDatabaseWrapper, name: str) -> str:
    return str(connection.ops.quote_name(name))


def role_weaknesses(connection: BaseDatabaseWrapper, role: str) -> list[str]:
    """Why ``role`` could get past the ledger's triggers, as sentences (empty: it cannot)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT rolsuper, rolbypassrls, rolcreaterole FROM pg_roles WHERE rolname = %s",
            [role],
        )
        row = cursor.fetchone()
        if row is None:
            return [f"there is no database role named {role!r}"]
        superuser, bypass_rls, create_role = row
        problems = []
        if superuser:
            problems.append(f"{role} is a superuser, who may switch any trigger off")
        if create_role:
            problems.append(f"{role} may create roles (and grant itself the owner's)")
        if bypass_rls:
            problems.append(f"{role} bypasses row-level security")
        cursor.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
            "AND pg_has_role(%s, c.relowner, 'USAGE') ORDER BY c.relname",
            [role],
        )
        owned = [name for (name,) in cursor.fetchall()]
        if owned:
            shown = ", ".join(owned[:3]) + (f" and {len(owned) - 3} more" if len(owned) > 3 else "")
            problems.append(
                f"{role} owns (or acts as the owner of) {shown}, and an owner may disable "
                "or drop the ledger's triggers"
            )
    return problems


def grant_app_role(connection: BaseDatabaseWrapper, role: str) -> Grant:
    """Give ``role`` the application's rights on this database, run as the owner role.

    Idempotent: run it after every ``migrate`` (new tables), it re-asserts the ledger's
    restrictions each time. Default privileges also give the role DML on tables the owner
    creates later, so a migration applied before the grant does not lock the server out.
    """
    if connection.vendor != "postgresql":
        raise RoleSetupError(
            "database roles exist only on PostgreSQL; the embedded SQLite default has one user"
        )
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_user, current_schema(), current_database()")
        owner, schema, database = cursor.fetchone()
        if role == owner:
            raise RoleSetupError(
                f"{role} is the role running this command (the owner, which migrates); the "
                "application needs a role of its own that owns nothing"
            )
        cursor.execute(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = %s "
            "AND relnamespace = current_schema()::regnamespace",
            [LEDGER_ENTRY_TABLE],
        )
        ledger_owner = cursor.fetchone()
        if ledger_owner is None:
            raise RoleSetupError("the ledger's tables do not exist yet: run migrate first")
        if ledger_owner[0] != owner:
            raise RoleSetupError(
                f"run this as the role that owns the tables ({ledger_owner[0]}), not as {owner}"
            )
    problems = role_weaknesses(connection, role)
    if problems:
        raise RoleSetupError(f"{role} cannot be the application's role: " + "; ".join(problems))

    q_role, q_owner = _quote(connection, role), _quote(connection, owner)
    q_schema, q_db = _quote(connection, schema), _quote(connection, database)
    entries, head = _quote(connection, LEDGER_ENTRY_TABLE), _quote(connection, LEDGER_HEAD_TABLE)
    statements = [
        f"GRANT CONNECT ON DATABASE {q_db} TO {q_role}",
        # Temporary tables could shadow the ledger's names in a careless function; the
        # triggers pin their search_path, and the application never needs them.
        f"REVOKE TEMPORARY ON DATABASE {q_db} FROM PUBLIC",
        f"REVOKE TEMPORARY ON DATABASE {q_db} FROM {q_role}",
        f"GRANT USAGE ON SCHEMA {q_schema} TO {q_role}",
        f"REVOKE CREATE ON SCHEMA {q_schema} FROM PUBLIC",
        f"REVOKE CREATE ON SCHEMA {q_schema} FROM {q_role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {q_schema} TO {q_role}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {q_schema} TO {q_role}",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {q_owner} IN SCHEMA {q_schema} "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {q_role}",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {q_owner} IN SCHEMA {q_schema} "
        f"GRANT USAGE, SELECT ON SEQUENCES TO {q_role}",
        # The ledger: read and append; the head: read and move (the triggers say how far).
        f"REVOKE ALL ON {entries} FROM PUBLIC",
        f"REVOKE ALL ON {entries} FROM {q_role}",
        f"GRANT SELECT, INSERT ON {entries} TO {q_role}",
        f'GRANT UPDATE ("actor_id") ON {entries} TO {q_role}',
        f"REVOKE ALL ON {head} FROM PUBLIC",
        f"REVOKE ALL ON {head} FROM {q_role}",
        f"GRANT SELECT, UPDATE ON {head} TO {q_role}",
    ]
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
        cursor.execute(
            "SELECT count(*) FROM information_schema.role_table_grants "
            "WHERE grantee = %s AND table_schema = %s AND privilege_type = 'SELECT'",
            [role, schema],
        )
        (tables,) = cursor.fetchone()
    return Grant(
        role=role,
        owner=owner,
        schema=schema,
        tables=int(tables),
        ledger_rights="entries: SELECT, INSERT, UPDATE(actor_id); head: SELECT, UPDATE",
    )
