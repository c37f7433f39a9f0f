"""The trainer that runs in every training pod: ``python -m orchestrator.trainer``.

Importing this package is light (no torch); the training stack is imported inside the
modules that need it. ``budget`` and ``errors`` are pure Python and safe for the controller.
"""

from __future__ import annotations

from orchestrator.trainer.errors import ExitCode

__all__ = ["ExitCode"]
