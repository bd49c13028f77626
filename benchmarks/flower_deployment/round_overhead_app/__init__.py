"""The round-overhead benchmark's workload as a Flower app, run by Flower's deployment runtime.

``benchmarks/round_overhead.py`` (``run_flower_deployment``) starts a SuperLink and one SuperNode
per site as separate processes and submits this app with ``flwr run``; the ServerApp
(``server_app``) drives FedAvg over the SuperNodes and the ClientApp (``client_app``) trains each
site's share with the platform's engine. The workload itself (model, data split, local training,
central evaluation) is the benchmark's, imported from ``round_overhead``, so the simulation and
the deployment runtime run the same code.
"""
