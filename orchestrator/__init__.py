"""kubetune: Kubernetes-native orchestration of parameter-efficient fine-tuning.

The import package is `orchestrator`; the distribution is `kubetune`. Nothing here
imports torch: the trainer's heavy dependencies live behind the `trainer` extra.
"""

from __future__ import annotations

__version__ = "0.1.0"
