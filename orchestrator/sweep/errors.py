"""Sweep errors."""

from __future__ import annotations


class SweepError(Exception):
    """Base class for sweep failures."""


class SweepConfigError(SweepError, ValueError):
    """The sweep spec cannot be turned into a study (bad space, sampler, pruner...)."""


class TrialNotFoundError(SweepError, KeyError):
    """No trial with this number in the study."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingMetricError(SweepError, KeyError):
    """A finished trial lacks a metric that an objective needs."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
