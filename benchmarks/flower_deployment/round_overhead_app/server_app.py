"""The ServerApp: FedAvg over every site for the run's rounds, timed as ``run_flower`` times
the simulation.

A round opens when its training is configured (``configure_train``, as ``configure_fit`` in the
simulation); the wall time of round ``r`` is the time between its opening and round ``r + 1``'s,
so it holds the messages to and from the SuperNodes, the ClientApps' work, the aggregation and
the central evaluation on the validation set. Each reply's ``train_seconds`` is that site's local
compute. The ServerApp writes both to the JSON file the run config's ``figures-path`` names, once
the run ends, failed or not (``error`` then says why), for the benchmark to read back:

    {"flwr": "1.42.0", "error": null,
     "opened": {"1": <perf_counter seconds>, ...}, "train_seconds": {"1": [<seconds>, ...], ...}}
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

import flwr
import round_overhead as workload
import torch  # noqa: F401 - Flower's ArrayRecord converts to torch only once it is imported
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class RoundTimedFedAvg(FedAvg):
    """FedAvg (weighted by each reply's ``num-examples``) that records when each round opens and
    every site's ``train_seconds``, and fails the run on any failed or missing reply: a round
    aggregated from fewer sites would not be the workload the other runs measure."""

    def __init__(self, sites: int) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,  # central evaluation only, as in the simulation
            min_train_nodes=sites,
            min_available_nodes=sites,
        )
        self.sites = sites
        self.opened: dict[int, float] = {}
        self.train_seconds: dict[int, list[float]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.opened[server_round] = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [m.error.reason for m in replies if m.has_error()]
        if failed or len(replies) != self.sites:
            raise RuntimeError(
                f"Flower round {server_round}: {len(replies)} replies of {self.sites}, "
                f"failures: {failed}"
            )
        self.train_seconds[server_round] = [
            float(m.content["metrics"]["train_seconds"]) for m in replies
        ]
        return super().aggregate_train(server_round, replies)


def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    metrics = workload.flower_central_evaluation(arrays.to_torch_state_dict())
    return MetricRecord({name: float(value) for name, value in metrics.items()})


def write_figures(path: Path, figures: dict) -> None:
    """Write ``figures`` whole or not at all: the benchmark polls for the file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(figures))
    os.replace(partial, path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    strategy = RoundTimedFedAvg(sites=int(config["num-sites"]))
    error = None
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(workload.flower_initial_state()),
            num_rounds=int(config["num-server-rounds"]),
            timeout=float(config["round-timeout"]),
            evaluate_fn=central_evaluation,
        )
    except BaseException:
        error = traceback.format_exc()
        raise
    finally:
        if config["figures-path"]:
            write_figures(
                Path(str(config["figures-path"])),
                {
                    "flwr": flwr.__version__,
                    "error": error,
                    "opened": strategy.opened,
                    "train_seconds": strategy.train_seconds,
                },
            )
