"""The ClientApp: one site's local training in a round, as the simulation's client does it.

Each SuperNode is started with ``--node-config "partition-id=<i> num-partitions=<n>"``: site
``i`` of ``n`` trains the share ``demo_split`` gives ``site_slugs(n)[i]``. The reply carries the
trained weights, the samples seen (``num-examples``, FedAvg's weight) and ``train_seconds``, the
time ``train_local`` took, which the ServerApp reports as the round's local compute.

The SuperNode starts a new ClientApp process for every message, so every round's
``train_seconds`` holds ``train_local``'s first call in a process (seconds of lazy
initialisation, where a warm call takes milliseconds): measured as the simulation measures its
clients, the deployment runtime's local compute is larger and its overhead smaller than the
cost of starting the processes.
"""

from __future__ import annotations

import round_overhead as workload
import torch  # noqa: F401 - Flower's ArrayRecord converts to torch only once it is imported
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    sites = int(context.node_config["num-partitions"])
    slugs = workload.site_slugs(sites)
    slug = slugs[int(context.node_config["partition-id"])]
    global_state = msg.content["arrays"].to_torch_state_dict()
    server_round = int(msg.content["config"]["server-round"])
    trained, samples, seconds = workload.flower_site_training(
        global_state, slugs, slug, server_round
    )
    reply = RecordDict(
        {
            "arrays": ArrayRecord(trained),
            "metrics": MetricRecord({"num-examples": samples, "train_seconds": seconds}),
        }
    )
    return Message(content=reply, reply_to=msg)
