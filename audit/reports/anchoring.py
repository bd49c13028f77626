"""Which signed, witnessed ledger checkpoint a report's head lies under (issue 16).

A report names the ledger head it was made from (``audit.reports.scope.Head``); that head is
only as trustworthy as the ledger it is read from, which the centre's database holds. The
ledger's checkpoints (``audit.ledger.checkpoints``) are signed by the centre and countersigned
by the sites' workers, who each keep their own copy, so naming the newest checkpoint and its
witnesses beside the head, with a proof that the head entry is in that checkpoint's tree, ties
the report to heads held outside the centre.

This is stated next to the report (its page, the export's answer, ``export_contributions``
and ``verify_report``), not written into the file: the file's bytes are a function of its head
alone (the same head gives the same bytes, which ``verify_report`` relies on), while the
checkpoints and their witnesses keep arriving after it was made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from audit.ledger.checkpoints import (
    LedgerRewritten,
    WitnessLine,
    checkpoint_latest,
    checkpoint_publish,
    checkpoint_witnesses,
    ledger_tree,
)
from audit.ledger.merkle import ProofError, entry_leaf, verify_inclusion
from audit.reports.scope import Head

__all__ = ["Anchor", "head_anchor"]


@dataclass(frozen=True)
class Anchor:
    """The newest checkpoint, its witnesses, and whether the report's head is in its tree.

    ``included`` is None when there is nothing to prove (no checkpoint, an empty head, or a
    checkpoint older than the head), else whether the head entry's inclusion proof holds
    against the checkpoint's signed root. ``problem`` says what is wrong, if anything.
    """

    tree_size: int | None = None
    root_hash: str = ""
    note: str = ""
    witnesses: list[WitnessLine] = field(default_factory=list)
    included: bool | None = None
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem

    def lines(self) -> list[str]:
        """The statement, one line each, as the commands print it."""
        if self.tree_size is None:
            return [f"ledger checkpoint: none signed yet{self._problem()}"]
        if self.included:
            proven = ", the report's head entry proven to be in it"
        elif self.included is None:
            proven = " (it does not cover the report's head)"
        else:
            proven = ""
        out = [
            f"ledger checkpoint: {self.tree_size} entries, root {self.root_hash}{proven}"
            f"{self._problem()}"
        ]
        if self.witnesses:
            out += [
                f"  witnessed by {w.site} at {w.witnessed_at:%Y-%m-%d %H:%M:%S} UTC"
                for w in self.witnesses
            ]
        else:
            out.append("  witnessed by no site yet (each site's worker does on its next task)")
        return out

    def _problem(self) -> str:
        return f": {self.problem}" if self.problem else ""


def head_anchor(head: Head, *, publish: bool = False) -> Anchor:
    """The newest checkpoint (signed now when ``publish``, so that it covers ``head``), its
    witnesses, and the proof that the head entry is in its tree."""
    problem = ""
    row = None
    if publish:
        try:
            row = checkpoint_publish()
        except LedgerRewritten as exc:
            problem = str(exc)
    if row is None:
        row = checkpoint_latest()
    if row is None:
        return Anchor(problem=problem)
    included: bool | None = None
    if 1 <= head.seq <= row.tree_size:
        try:
            tree = ledger_tree()
            proof = tree.inclusion_proof(head.seq - 1, row.tree_size)
            verify_inclusion(
                entry_leaf(head.entry_hash),
                head.seq - 1,
                row.tree_size,
                proof,
                bytes.fromhex(row.root_hash),
            )
            included = True
        except (ProofError, LedgerRewritten, ValueError) as exc:
            included = False
            problem = problem or (
                f"the head entry #{head.seq} is NOT in the tree of the signed checkpoint "
                f"{row.tree_size} ({exc}): the ledger was rewritten under it"
            )
    return Anchor(
        tree_size=row.tree_size,
        root_hash=row.root_hash,
        note=row.note,
        witnesses=checkpoint_witnesses(row),
        included=included,
        problem=problem,
    )
