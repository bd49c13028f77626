"""The slow part of closing a round: making the round's model from the sites' updates, and
evaluating it (docs/architecture.md, section 4, step 3).

The coordinator (``training.rounds.coordinator``) claims a round, then calls these outside any
transaction, then records the result. Nothing here changes a row.

``fedavg`` sends the global model to every site at once and averages their updates (weighted
by samples, mask-aware, streaming: :class:`training.fl.aggregate.StreamingFedAvg`). ``cyclic``
sends the model to one site at a time in :func:`training.fl.aggregate.cyclic_order`; each site
starts from the previous site's result, and the round's model is the last result. A site's
result is its delta applied to its own start model (or the start model unchanged when its
update was rejected or never came), so the chain never depends on recomputing earlier sites.

torch is imported inside the functions that need it, not to dodge an import loop: a process
that imports the coordinator and never aggregates never pays for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from consortium.core.prepared import PreparedQuery
from training.fl.update import masked_delta
from training.jobs.spec import loss_of
from training.models import Round, SiteDataset, SiteUpdate, TrainingJob
from training.rounds.states import build_model, load_state, load_update
from training.rounds.validation_sets import validation_set_of

if TYPE_CHECKING:
    import torch

__all__ = [
    "accepted_updates",
    "cyclic_result",
    "cyclic_rows",
    "cyclic_sites",
    "evaluate",
    "fedavg",
    "site_result",
]

State = dict[str, "torch.Tensor"]


# The round's rows with their institutions, in site order: every close reads them twice (the
# accepted ones to aggregate, all of them for the ledger), so they are compiled once per
# connection (consortium.core.prepared).
def _site_rows(round_id: int, **only):
    return (
        SiteUpdate.objects.filter(round_id=round_id, **only)
        .select_related("institution")
        .order_by("institution__slug")
    )


_ROUND_ROWS = PreparedQuery(_site_rows, round_id=int)
_ACCEPTED_ROWS = PreparedQuery(
    lambda round_id: _site_rows(round_id, status=SiteUpdate.Status.ACCEPTED), round_id=int
)


def round_rows(rnd: Round) -> list[SiteUpdate]:
    """Every site's row of the round (with its institution), in site order."""
    return _ROUND_ROWS.all(round_id=rnd.pk)


def accepted_updates(rnd: Round) -> list[SiteUpdate]:
    """The round's accepted updates (with their institutions), in site order."""
    return _ACCEPTED_ROWS.all(round_id=rnd.pk)


def fedavg(global_state: State, updates: list[SiteUpdate], *, zero_filled: bool = False) -> State:
    """The FedAvg round's model: the sample-weighted, mask-aware (or, with ``zero_filled``,
    the spec's ``zero_filled_mean``, zero-filled) average of the updates applied to the
    round's global model."""
    from training.fl.aggregate import StreamingFedAvg, apply_update  # lazy torch (docstring)

    floating = {n: t for n, t in global_state.items() if t.is_floating_point()}
    avg = StreamingFedAvg(floating, zero_filled=zero_filled)
    for update in updates:
        delta, mask = load_update(update.update_digest)
        avg.add(delta, mask or None, update.samples)
    return apply_update(global_state, avg.result())


def _apply_one(state: State, digest: str) -> State:
    from training.fl.aggregate import apply_update  # lazy torch (docstring)

    delta, mask = load_update(digest)
    if mask:
        delta = masked_delta(delta, mask)
    return apply_update(state, delta)


def cyclic_sites(slugs: list[str], round_index: int) -> list[str]:
    """The order in which a cyclic round visits ``slugs``."""
    from training.fl.aggregate import cyclic_order  # lazy torch (docstring)

    # cyclic_order counts rounds from 0; ours from 1.
    return list(cyclic_order(sorted(slugs), round_index - 1))


def cyclic_rows(rnd: Round) -> list[SiteUpdate]:
    """The round's ``SiteUpdate`` rows in the cyclic round's order."""
    rows = {u.institution.slug: u for u in rnd.updates.select_related("institution")}
    return [rows[slug] for slug in cyclic_sites(list(rows), rnd.index)]


def site_result(update: SiteUpdate) -> State:
    """The model a sent cyclic site hands on: its delta applied to the model it was sent, or
    that model unchanged when its update was rejected or never came."""
    state = load_state(update.start_digest)
    if update.status == SiteUpdate.Status.ACCEPTED:
        state = _apply_one(state, update.update_digest)
    return state


def cyclic_result(rnd: Round) -> State:
    """The cyclic round's model: the result of the last site it was sent to (sites are sent in
    order, so the sent ones are a prefix of the order)."""
    sent = [u for u in cyclic_rows(rnd) if u.sent_at is not None and u.start_digest]
    if not sent:
        return load_state(rnd.global_model_in.digest)
    return site_result(sent[-1])


def evaluate(job: TrainingJob, dataset: SiteDataset, state: State) -> dict:
    """Metrics of the new global model on the consortium's validation set
    (:func:`training.rounds.validation_sets.validation_set_of`: an uploaded central validation
    set, named by its digest in the metrics, or the bundled one)."""
    from training.fl.evaluate import evaluate as evaluate_model  # lazy torch (module docstring)

    try:
        x, y, held = validation_set_of(job)
    except ValueError as exc:
        return {"validation": f"unavailable: {exc}"}
    model = build_model(job.spec, dataset)
    model.load_state_dict(state)
    metrics = evaluate_model(model, x, y, modality=dataset.modality, loss=loss_of(job.spec))
    out = {"validation_" + k: v for k, v in metrics.items()} | {"validation_records": len(y)}
    if held is not None:
        out["validation_set"] = held.digest
    return out
