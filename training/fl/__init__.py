"""The federated engine in plain PyTorch, with no Django import (docs/architecture.md, section 3).

It arrives with the engine issue; torch is imported lazily inside the worker's
tasks so CUDA never initialises before a fork.
"""
