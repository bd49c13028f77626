"""The house rules that no single feature test would notice breaking (docs/architecture.md).

- The layer contracts in ``.importlinter`` hold: nothing imports upward, the engine imports
  nothing of the project, the ledger no app, governance neither training nor the reports, no
  loops between siblings (imports inside functions count).
- The hospital's worker runs without Django's database layer or any model.
- Every ledger writer names a registered event, and every payload it writes has the fields its
  event declares (read from the source, so branches no test drives are checked too).
- Every Celery task and every message sent names a task of ``training.queues``.
- A module over about 500 lines says at its top why it is one module.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from audit.ledger import events as ledger_events
from training import queues

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_PACKAGES = ("consortium", "training", "audit")
LONG_MODULE_LINES = 550
LONG_MODULE_REASON = "Why one module:"


def product_modules() -> Iterator[tuple[Path, ast.Module]]:
    for package in PRODUCT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            yield path, ast.parse(path.read_text(), filename=str(path))


def _name_of(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _event_constant(node: ast.expr | None) -> str | None:
    """``ledger_events.NAME`` -> ``NAME``; anything else -> None."""
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "ledger_events"
    ):
        return node.attr
    return None


def test_the_layer_contracts_hold():
    # In a process of its own: grimp's scan trips over modules Django has already set up.
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_site_worker_imports_no_django_model_or_database_layer():
    site_modules = sorted(
        "training.site." + p.stem
        for p in (ROOT / "training" / "site").glob("*.py")
        if p.stem != "__init__"
    )
    assert site_modules
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in site_modules)
        + "bad = sorted(m for m in sys.modules if m.startswith('django.db') or m == 'torch'"
        " or m.endswith('.models') and m.split('.')[0] in ('training', 'consortium', 'audit'))\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# --- Ledger writers -------------------------------------------------------------------------


@dataclass
class Forwarder:
    """A module's helper that hands its ``event`` argument on to ``append_entry`` (the
    services' ``_record``): the payload keys it adds itself, the parameters that are not
    payload, and whether it spreads its own ``**kwargs`` into the payload."""

    event_param: str
    own_keys: set[str] = field(default_factory=set)
    params: set[str] = field(default_factory=set)
    spreads_kwargs: bool = False


@dataclass
class Write:
    where: str
    event: str | None
    keys: set[str] | None  # None: not readable from the source (a computed payload)


def _payload_keys(node: ast.expr | None, kwargs_name: str | None) -> tuple[set[str] | None, bool]:
    """The literal keys of a payload dict and whether it spreads ``**kwargs_name``."""
    if node is None:
        return set(), False
    if not isinstance(node, ast.Dict):
        return None, False
    keys: set[str] = set()
    spreads = False
    for key, value in zip(node.keys, node.values, strict=True):
        if key is None:
            if isinstance(value, ast.Name) and value.id == kwargs_name:
                spreads = True
            else:
                return None, False
        elif isinstance(key, ast.Constant) and isinstance(key.value, str):
            keys.add(key.value)
        else:
            return None, False
    return keys, spreads


def _forwarders(tree: ast.Module) -> dict[str, Forwarder]:
    found: dict[str, Forwarder] = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        params = [a.arg for a in fn.args.args + fn.args.kwonlyargs]
        kwargs_name = fn.args.kwarg.arg if fn.args.kwarg else None
        for call in ast.walk(fn):
            if not (isinstance(call, ast.Call) and _name_of(call.func) == "append_entry"):
                continue
            kw = {k.arg: k.value for k in call.keywords if k.arg}
            event = kw.get("event")
            if isinstance(event, ast.Name) and event.id in params:
                keys, spreads = _payload_keys(kw.get("payload"), kwargs_name)
                if keys is None and isinstance(kw.get("payload"), ast.Name):
                    keys, spreads = set(), kw["payload"].id == kwargs_name
                found[fn.name] = Forwarder(
                    event_param=event.id,
                    own_keys=keys or set(),
                    params=set(params),
                    spreads_kwargs=spreads,
                )
    return found


def ledger_writes() -> Iterator[Write]:
    modules = list(product_modules())
    # A shared helper (``record_governance_event``) is called from other modules: known by
    # name everywhere, and a module's own helper of the same name wins.
    shared: dict[str, Forwarder] = {}
    for _path, tree in modules:
        shared.update(_forwarders(tree))
    for path, tree in modules:
        rel = path.relative_to(ROOT)
        forwarders = {**shared, **_forwarders(tree)}
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call):
                continue
            name = _name_of(call.func)
            where = f"{rel}:{call.lineno}"
            if name == "append_entry":
                kw = {k.arg: k.value for k in call.keywords if k.arg}
                event = kw.get("event")
                if isinstance(event, ast.Name) and any(
                    event.id == f.event_param for f in forwarders.values()
                ):
                    continue  # inside a forwarder: checked at its callers
                keys, _ = _payload_keys(kw.get("payload"), None)
                yield Write(where, _event_constant(event), keys)
            elif name in forwarders:
                fwd = forwarders[name]
                event = call.args[0] if call.args else None
                kw = {k.arg: k.value for k in call.keywords if k.arg}
                event = kw.get(fwd.event_param, event)
                if any(k.arg is None for k in call.keywords):
                    keys = None  # ``**something``: not readable here
                else:
                    extra = {k.arg for k in call.keywords if k.arg and k.arg not in fwd.params}
                    keys = fwd.own_keys | (extra if fwd.spreads_kwargs else set())
                yield Write(where, _event_constant(event), keys)


def test_every_ledger_writer_names_a_registered_event():
    writes = list(ledger_writes())
    assert len(writes) >= 30, "the scan found too few writers: is it still reading the code?"
    unnamed = [w.where for w in writes if w.event is None]
    assert not unnamed, f"ledger writes that do not name an audit.ledger.events constant: {unnamed}"
    unknown = [(w.where, w.event) for w in writes if not hasattr(ledger_events, w.event or "")]
    assert not unknown, unknown
    written = {w.event for w in writes}
    declared = {
        name
        for name in dir(ledger_events)
        if isinstance(getattr(ledger_events, name), ledger_events.Event)
    }
    assert declared <= written, f"events declared that nothing writes: {sorted(declared - written)}"


def test_every_readable_payload_has_the_fields_its_event_declares():
    problems = []
    for write in ledger_writes():
        if write.keys is None or write.event is None:
            continue
        event = getattr(ledger_events, write.event)
        required = {f.name for f in event.fields if not f.optional}
        if missing := required - write.keys:
            problems.append(f"{write.where} {event}: missing {sorted(missing)}")
        if undeclared := write.keys - event.field_names():
            problems.append(f"{write.where} {event}: undeclared {sorted(undeclared)}")
    assert not problems, problems


def test_a_payload_that_breaks_its_schema_is_refused_before_anything_is_written(db):
    from audit.ledger.chain import append_entry
    from audit.models import LedgerEntry

    before = LedgerEntry.objects.count()
    with pytest.raises(ledger_events.EventPayloadError) as info:
        append_entry(event=ledger_events.CONSORTIUM_CREATED, payload={"name": 3, "colour": "blue"})
    message = str(info.value)
    assert "missing field 'slug'" in message
    assert "undeclared field 'colour'" in message
    assert "field 'name' must be string, not int" in message
    assert LedgerEntry.objects.count() == before


def test_an_event_compares_and_stores_as_its_plain_name():
    assert ledger_events.ROUND_CLOSED == "round.closed"
    assert {"round.closed": 1}[ledger_events.ROUND_CLOSED] == 1
    assert ledger_events.registered("round.closed") is ledger_events.ROUND_CLOSED
    assert ledger_events.registered("no.such_event") is None
    names = [e.name for e in ledger_events.all_events()]
    assert len(names) == len(set(names))


# --- Celery tasks -----------------------------------------------------------------------------


def test_every_task_and_every_message_names_a_registered_task():
    registered = {task.name for task in queues.TASKS}
    declared: set[str] = set()
    problems = []
    for path, tree in product_modules():
        rel = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name_of(node.func) == "shared_task":
                for kw in node.keywords:
                    if kw.arg == "name":
                        if isinstance(kw.value, ast.Constant):
                            problems.append(f"{rel}:{node.lineno} task named by a string")
                        else:
                            declared.add(ast.unparse(kw.value))
            if isinstance(node, ast.Call) and _name_of(node.func) == "send_task":
                first = node.args[0] if node.args else None
                if isinstance(first, ast.Constant):
                    problems.append(f"{rel}:{node.lineno} message sent by a string name")
    assert not problems, problems
    assert declared == {f"queues.{n}.name" for n in _task_constants()}
    from consortium.celery import app

    app.loader.import_default_modules()
    assert registered <= set(app.tasks), sorted(registered - set(app.tasks))


def _task_constants() -> set[str]:
    return {n for n in dir(queues) if isinstance(getattr(queues, n), queues.TaskName)}


# --- Module size ------------------------------------------------------------------------------


def test_a_long_module_says_why_it_is_one_module():
    long_without_reason = []
    for path, tree in product_modules():
        lines = len(path.read_text().splitlines())
        if lines <= LONG_MODULE_LINES:
            continue
        doc = ast.get_docstring(tree) or ""
        if LONG_MODULE_REASON not in doc:
            long_without_reason.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not long_without_reason, (
        f"modules over {LONG_MODULE_LINES} lines whose docstring has no "
        f"{LONG_MODULE_REASON!r} paragraph: {long_without_reason}"
    )
