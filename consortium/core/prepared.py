"""Read queries compiled once per database connection, for the hot paths: the site API's
requests and the coordinator's close and opening of a round.

Compiling a queryset to SQL costs more CPU than the database spends running it: Django builds
the query (every ``filter`` clones it and resolves its lookups), then its compiler walks every
column of every model a ``select_related`` joins. Profiling the site API's server under thirty
simulated sites (py-spy, samples holding the GIL) found a quarter of its Python time in
``SQLCompiler.as_sql`` and the query building before it, for the same dozen queries run with
other values; running them took a fortieth.

A :class:`PreparedQuery` builds its queryset once per connection with marker values in place of
its parameters, compiles it, finds each marker among the SQL's parameters, and keeps the SQL with
what Django needs to turn a row into objects (the select list, its converters, the populators of
the related objects). Every later call substitutes the values and only executes. What it returns
is what the queryset returns: the same model instances, with the ``select_related`` objects
cached on them and the annotations set, through Django's own ``from_db``, converters and
``RelatedPopulator``; ``tests/rounds/test_prepared_queries.py`` holds every query the site API
and the coordinator prepare to the plain queryset's answer, on both databases. (In the
coordinator's close, a wall-clock profile found a fifth of the close in ``as_sql``.)

It refuses, when first compiled (so a test finds it), what it cannot substitute faithfully: a
parameter the lookup transforms (``contains``, ``iexact``: the value is rewritten before it
reaches the SQL), one that appears in no parameter, a value of another type than declared.
Queries run through the connection's own cursor, so the query log, the debug cursor and the
tests' query counts see them as before.
"""

from __future__ import annotations

import secrets
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured, MultipleObjectsReturned
from django.db import connections
from django.db.models import QuerySet
from django.db.models.query import get_related_populators
from django.db.transaction import TransactionManagementError

__all__ = ["PreparedQuery"]

#: The kinds of parameter a prepared query takes (what a marker can stand for unchanged).
_KINDS = (int, str)


def _markers(params: dict[str, type]) -> dict[str, int | str]:
    """A value of each parameter's kind to find it by among the compiled SQL's parameters.

    Integers must stay within the smallest integer column's range (Django turns a lookup
    beyond a column's range into an empty result, not a parameter), so they are drawn from
    1,000 to 32,767: a constant of the query could equal one by chance, which is why
    :meth:`PreparedQuery._compile` compiles twice with different markers and requires the
    same positions both times (and tries again when they differ)."""
    markers: dict[str, int | str] = {}
    for name, kind in params.items():
        if kind is int:
            value: int | str = 1000 + secrets.randbelow(31768)
            while value in markers.values():
                value = 1000 + secrets.randbelow(31768)
        else:
            value = f"\u27e6prepared:{name}:{secrets.token_hex(8)}\u27e7"
        markers[name] = value
    return markers


@dataclass(frozen=True)
class _Compiled:
    sql: str
    params: tuple
    positions: dict[str, tuple[int, ...]]
    compiler: Any
    converters: dict
    model: type
    init_list: list[str]
    model_slice: slice
    related_populators: list
    annotation_col_map: dict
    for_update: bool
    alias: str


class PreparedQuery:
    """A read query with named parameters, compiled once per database connection.

    ``build`` takes the parameters by name and returns the queryset; ``params`` names each
    parameter's kind (``int`` or ``str``). ``one=True`` prepares it as ``QuerySet.get()``
    runs it (no ordering, at most two rows) for :meth:`one_or_none`.
    """

    def __init__(self, build: Callable[..., QuerySet], *, one: bool = False, **params: type):
        for name, kind in params.items():
            if kind not in _KINDS:
                raise ImproperlyConfigured(
                    f"prepared query parameter {name}: {kind!r} is not int or str"
                )
        self._build = build
        self._params = params
        self._one = one
        self._by_connection: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._known_alias: str | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<PreparedQuery {getattr(self._build, '__qualname__', self._build)!r}>"

    def all(self, **values: Any) -> list:
        """Every object the queryset gives for these values, in its order."""
        return self._run(values)

    def one_or_none(self, **values: Any) -> Any:
        """The one object for these values, or None; ``MultipleObjectsReturned`` for two."""
        if not self._one:
            raise ImproperlyConfigured(f"{self!r} was not prepared with one=True")
        found = self._run(values)
        if len(found) > 1:
            raise MultipleObjectsReturned(f"{self!r} found more than one row for {values!r}")
        return found[0] if found else None

    # -- compiling ---------------------------------------------------------------------

    def _compile(self) -> _Compiled:
        # Three tries: a constant of the query that happens to equal a marker moves a place
        # in one compilation only; a query whose SQL truly changes with its values fails all.
        for _ in range(3):
            compiled = self._compile_with(_markers(self._params))
            again = self._compile_with(_markers(self._params))
            if again.sql == compiled.sql and again.positions == compiled.positions:
                return compiled
        raise ImproperlyConfigured(
            f"{self!r}: its SQL or the places of its parameters change with their values: "
            "prepare it otherwise"
        )

    def _compile_with(self, markers: dict[str, int | str]) -> _Compiled:
        queryset = self._build(**markers)
        if queryset._known_related_objects:  # noqa: SLF001 - a related manager's queryset
            raise ImproperlyConfigured(f"{self!r}: a related manager's queryset is not supported")
        if self._one:
            queryset = queryset.order_by()
            if (
                not queryset.query.select_for_update
                or connections[queryset.db].features.supports_select_for_update_with_limit
            ):
                queryset = queryset[:2]
        alias = queryset.db
        compiler = queryset.query.get_compiler(using=alias)
        sql, params = compiler.as_sql()
        positions: dict[str, tuple[int, ...]] = {}
        for name, marker in markers.items():
            found = tuple(
                i for i, p in enumerate(params) if type(p) is type(marker) and p == marker
            )
            if not found:
                raise ImproperlyConfigured(
                    f"{self!r}: parameter {name} does not reach the SQL unchanged (a lookup that "
                    "rewrites its value, or one that is not used): prepare it otherwise"
                )
            positions[name] = found
        select, klass_info = compiler.select, compiler.klass_info
        fields = [s[0] for s in select[0 : compiler.col_count]]
        if compiler.has_composite_fields(fields):
            raise ImproperlyConfigured(f"{self!r}: composite fields are not supported")
        start, end = klass_info["select_fields"][0], klass_info["select_fields"][-1] + 1
        return _Compiled(
            sql=sql,
            params=tuple(params),
            positions=positions,
            compiler=compiler,
            converters=compiler.get_converters(fields),
            model=klass_info["model"],
            init_list=[f[0].target.attname for f in select[start:end]],
            model_slice=slice(start, end),
            related_populators=get_related_populators(klass_info, select, alias),
            annotation_col_map=compiler.annotation_col_map,
            for_update=bool(queryset.query.select_for_update),
            alias=alias,
        )

    def _compiled_for(self, connection) -> _Compiled:
        # One per connection object (each thread has its own): the compiler and its
        # converters are bound to the connection they were made with.
        with self._lock:
            compiled = self._by_connection.get(connection)
        if compiled is None:
            compiled = self._compile()
            with self._lock:
                self._by_connection[connection] = compiled
        return compiled

    # -- running -----------------------------------------------------------------------

    def _run(self, values: dict[str, Any]) -> list:
        if set(values) != set(self._params):
            raise TypeError(f"{self!r} takes {sorted(self._params)}, got {sorted(values)}")
        for name, value in values.items():
            kind = self._params[name]
            if type(value) is not kind:  # bool is an int, and would compare equal to 0 or 1
                raise TypeError(f"{self!r}: {name} must be {kind.__name__}, got {value!r}")
        # The connection of the queryset's database: build() names it (the default here).
        connection = connections[self._alias()]
        compiled = self._compiled_for(connection)
        if (  # what Django's compiler checks before it runs a SELECT ... FOR UPDATE
            compiled.for_update
            and connection.features.has_select_for_update
            and connection.features.supports_transactions
            and connection.get_autocommit()
        ):
            raise TransactionManagementError(
                "select_for_update cannot be used outside of a transaction."
            )
        params = list(compiled.params)
        for name, found in compiled.positions.items():
            for i in found:
                params[i] = values[name]
        with connection.cursor() as cursor:
            cursor.execute(compiled.sql, params)
            rows = cursor.fetchall()
        if compiled.converters:
            rows = list(compiled.compiler.apply_converters(rows, compiled.converters))
        objects = []
        model, init_list, part = compiled.model, compiled.init_list, compiled.model_slice
        for row in rows:
            obj = model.from_db(compiled.alias, init_list, row[part])
            for populator in compiled.related_populators:
                populator.populate(row, obj)
            for attr, position in compiled.annotation_col_map.items():
                setattr(obj, attr, row[position])
            objects.append(obj)
        return objects

    def _alias(self) -> str:
        alias = self._known_alias
        if alias is None:
            # The alias the queryset reads from, without compiling it: the router's answer
            # for its model (the default database in this project).
            alias = self._build(**_markers(self._params)).db
            self._known_alias = alias
        return alias
