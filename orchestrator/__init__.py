"""kubetune: Kubernetes-native orchestration of parameter-efficient fine-tuning.

The import package is `orchestrator`; the distribution is `kubetune`. Nothing here
imports torch: the trainer's heavy dependencies live behind the `trainer` extra. The SDK
names are loaded on first use, so `import orchestrator` stays cheap::

    from orchestrator import Client, FineTuneJob, FineTuneSweep
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from orchestrator.api import FineTuneJob, FineTuneJobSpec, FineTuneSweep, FineTuneSweepSpec
    from orchestrator.client import Client, KubetuneError
    from orchestrator.local import LocalClient

_LAZY = {
    "Client": "orchestrator.client",
    "KubetuneError": "orchestrator.client",
    "LocalClient": "orchestrator.local",
    "FineTuneJob": "orchestrator.api",
    "FineTuneJobSpec": "orchestrator.api",
    "FineTuneSweep": "orchestrator.api",
    "FineTuneSweepSpec": "orchestrator.api",
}

__all__ = [
    "Client",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneSweep",
    "FineTuneSweepSpec",
    "KubetuneError",
    "LocalClient",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
