"""Looking at a sweep: ``kubetune status SWEEP --plot out.png`` and ``kubetune dashboard``.

The picture is drawn from the sweep's status (status.trialList, bestTrial, paretoFront), so
it works the same for a cluster sweep and a local one, with no access to the study database.
The dashboard is optuna-dashboard on the study storage itself: the local SQLite file, or in a
cluster a study URL the user can read (see docs/sweeps.md). Both need the ``dashboard``
extra (``pip install 'kubetune[dashboard]'``); matplotlib and optuna-dashboard are imported
only here, only when asked for.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.api import reasons as R
from orchestrator.client import KubetuneError, objective_directions

EXTRA_HINT = "pip install 'kubetune[dashboard]'"


def require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise KubetuneError(f"{what} needs the Python package {module!r}: {EXTRA_HINT}")


def plot_sweep(sweep: Mapping[str, Any], rows: list[dict[str, Any]], path: Path) -> dict[str, int]:
    """Write the optimisation history (and, with two objectives, the Pareto front) as a PNG.

    History: every succeeded trial's first objective by trial number, infeasible trials
    (breaking spec.constraints) as red crosses, and the best feasible value so far as a step
    line. Front: all succeeded trials in objective space, the status' Pareto front joined.
    Returns what was drawn: ``{"trials": n, "infeasible": k, "front": m}``.
    """
    require("matplotlib", "--plot")
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    objectives = objective_directions(sweep)
    status = sweep.get("status") or {}
    done = [r for r in rows if r.get("state") == R.TRIAL_SUCCEEDED and r.get("values")]
    feasible = [r for r in done if r.get("feasible") is not False]
    infeasible = [r for r in done if r.get("feasible") is False]
    front = status.get("paretoFront") or []
    multi = len(objectives) > 1
    fig, axes = plt.subplots(1, 2 if multi else 1, figsize=(12 if multi else 7, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    metric, direction = objectives[0]
    sign = -1.0 if direction == "maximize" else 1.0
    ax.scatter([r["number"] for r in feasible], [r["values"][0] for r in feasible],
               s=28, color="tab:blue", label="trial")
    if infeasible:
        ax.scatter([r["number"] for r in infeasible], [r["values"][0] for r in infeasible],
                   s=36, marker="x", color="tab:red", label="infeasible (constraints)")
    best_x: list[int] = []
    best_y: list[float] = []
    best = None
    for r in sorted(feasible, key=lambda r: r["number"]):
        v = float(r["values"][0])
        if best is None or sign * v < sign * best:
            best = v
        best_x.append(r["number"])
        best_y.append(best)
    if best_x:
        ax.step(best_x, best_y, where="post", color="tab:green", label="best feasible so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} ({direction})")
    ax.set_title(f"{sweep['metadata']['name']}: optimisation history")
    ax.legend(loc="best", fontsize="small")
    if multi:
        ax2 = axes[0][1]
        m1, _ = objectives[1]
        ax2.scatter([r["values"][0] for r in feasible], [r["values"][1] for r in feasible],
                    s=28, color="tab:blue", alpha=0.6, label="trial")
        if infeasible:
            ax2.scatter([r["values"][0] for r in infeasible],
                        [r["values"][1] for r in infeasible],
                        s=36, marker="x", color="tab:red", label="infeasible (constraints)")
        pts = sorted((float(t["values"][0]), float(t["values"][1])) for t in front
                     if len(t.get("values") or []) > 1)
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:orange",
                     label="Pareto front")
        ax2.set_xlabel(metric)
        ax2.set_ylabel(m1)
        ax2.set_title("Pareto front")
        ax2.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return {"trials": len(done), "infeasible": len(infeasible), "front": len(front)}


def study_url_and_name(sweep: Mapping[str, Any], storage: str | None, local_url: str | None
                       ) -> tuple[str, str]:
    """The study storage URL and the study's name for ``kubetune dashboard``."""
    meta = sweep["metadata"]
    name = (sweep.get("status") or {}).get("studyName")
    if not name:
        raise KubetuneError(f"sweep {meta['name']} has no study yet (status.studyName is empty)")
    url = storage or local_url
    if not url:
        raise KubetuneError(
            "the controller keeps the study in its own storage: pass --storage with a study "
            "URL you can read (e.g. sqlite:///optuna.db after `kubectl cp` of the controller's "
            "/var/lib/kubetune/optuna.db, or a read-only URL of the database in "
            "KUBETUNE_STUDY_STORAGE); see docs/sweeps.md"
        )
    return str(url), str(name)


def study_id(url: str, name: str) -> int:
    """optuna-dashboard addresses studies by id: /dashboard/studies/<id>."""
    import optuna

    storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True)
    try:
        return int(storage.get_study_id_from_name(name))
    except KeyError:
        raise KubetuneError(f"no study named {name!r} in {url}") from None


def serve_dashboard(url: str, host: str, port: int) -> Any:
    """A WSGI server for optuna-dashboard on ``url`` (call ``serve_forever``); its port is
    ``server.server_port`` (useful with port 0)."""
    require("optuna_dashboard", "kubetune dashboard")
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import optuna
    from optuna_dashboard import wsgi

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True)
    return make_server(host, port, wsgi(storage), handler_class=Quiet)
