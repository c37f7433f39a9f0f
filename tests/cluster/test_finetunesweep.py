"""FineTuneSweep controller against the real control plane; the test plays the trainers
with a known objective so the optimum is known."""

from __future__ import annotations

import json
import random
import statistics
import time
import urllib.error

import optuna
import pytest

from orchestrator.sweep import mint_token
from tests.cluster.controller_support import ControllerProcess, get, items, wait_phase
from tests.cluster.sweep_driver import OPTIMUM, Driver, known_loss, pod_report_token
from tests.support import Cluster, wait_for

pytestmark = pytest.mark.cluster

TEMPLATE = {
    "model": {"uri": "s3://models/tiny-llama"},
    "data": {"train": "s3://data/train.jsonl", "eval": "s3://data/eval.jsonl"},
    "method": {"type": "lora", "rank": 8, "alpha": 16},
    "training": {"globalBatchSize": 8, "microBatchSize": 1},
    "distributed": {"nodes": 1, "gpusPerNode": 1},
    "output": {"uri": "s3://adapters/sweep/"},
    "backoffLimit": 0,
}
PARAMS = [
    {"name": "method.rank", "int": {"low": 2, "high": 128, "log": True}},
    {"name": "training.learningRate", "float": {"low": 1e-5, "high": 1e-2, "log": True}},
]


def _sweep(name: str, **spec: object) -> dict:
    body = {
        "template": TEMPLATE,
        "parameters": PARAMS,
        "objectives": [{"metric": "evalLoss", "direction": "minimize"}],
        "algorithm": {"sampler": "tpe", "seed": 1},
        "maxTrials": 20,
        "parallelism": 4,
        "maxFailedTrials": 3,
    }
    body.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": body,
    }


def _apply(cluster: Cluster, namespace: str, obj: dict) -> None:
    _credentials(cluster, namespace)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _credentials(cluster: Cluster, namespace: str) -> None:
    # trials inherit the controller's default credentials Secret name
    if (
        cluster.kubectl("get", "secret", "s3-credentials", "-n", namespace, check=False).returncode
        != 0
    ):
        cluster.kubectl(
            "create",
            "secret",
            "generic",
            "s3-credentials",
            "-n",
            namespace,
            "--from-literal=AWS_ACCESS_KEY_ID=k",
            "--from-literal=AWS_SECRET_ACCESS_KEY=s",
        )


def _done(cluster: Cluster, namespace: str, name: str) -> bool:
    phase = (get(cluster, "fts", namespace, name).get("status") or {}).get("phase")
    return phase in ("Succeeded", "Failed")


def _random_baseline(budget: int, seeds: int = 5) -> float:
    """Median best value of random-sampler sweeps over the same space and budget."""
    bests = []
    for seed in range(seeds):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))

        def objective(trial: optuna.Trial) -> float:
            return known_loss(
                {
                    "method.rank": trial.suggest_int("method.rank", 2, 128, log=True),
                    "training.learningRate": trial.suggest_float(
                        "training.learningRate", 1e-5, 1e-2, log=True
                    ),
                }
            )

        study.optimize(objective, n_trials=budget)
        bests.append(study.best_value)
    return statistics.median(bests)


def test_tpe_sweep_finds_the_optimum_within_parallelism(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _apply(cluster, namespace, _sweep("tpe"))
    driver = Driver(cluster, namespace, "tpe", controller.report_url)
    driver.run_until(lambda: _done(cluster, namespace, "tpe"), timeout=300)

    sweep = get(cluster, "fts", namespace, "tpe")
    status = sweep["status"]
    assert status["phase"] == "Succeeded", status
    assert status["trials"]["created"] == 20 and status["trials"]["succeeded"] == 20, status
    assert driver.max_running <= 4
    trials = driver.trials()
    assert len(trials) == 20 and len({t["metadata"]["name"] for t in trials}) == 20
    best = status["bestTrial"]
    assert best["metrics"]["evalLoss"] == pytest.approx(known_loss(best["parameters"]))
    assert best["metrics"]["evalLoss"] < OPTIMUM + 0.35
    assert best["metrics"]["evalLoss"] < _random_baseline(20)
    assert best["artifact"]["uri"].startswith("s3://adapters/")
    table = cluster.kubectl("get", "fts", "tpe", "-n", namespace).stdout
    assert "Succeeded" in table and "20" in table


def test_two_objectives_pareto_front_equals_optuna(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    spec = _sweep(
        "pareto",
        maxTrials=12,
        parallelism=3,
        objectives=[
            {"metric": "evalLoss", "direction": "minimize"},
            {"metric": "trainableParamPercent", "direction": "minimize"},
        ],
        algorithm={"sampler": "nsga2", "seed": 3},
    )
    _apply(cluster, namespace, spec)
    # bigger rank: lower loss, more parameters — a real trade-off
    driver = Driver(
        cluster,
        namespace,
        "pareto",
        controller.report_url,
        loss=lambda p: 2.0 / (1 + p["method.rank"]) + 0.1 * p["training.learningRate"] * 100,
        percent=lambda p: 0.01 * p["method.rank"],
    )
    driver.run_until(lambda: _done(cluster, namespace, "pareto"), timeout=240)
    status = get(cluster, "fts", namespace, "pareto")["status"]
    assert status["phase"] == "Succeeded"
    front = status["paretoFront"]
    assert front
    pts = [(t["values"][0], t["values"][1]) for t in front]
    for a in pts:  # non-dominated
        assert not any(b[0] <= a[0] and b[1] <= a[1] and b != a for b in pts)
    study = optuna.load_study(
        study_name=status["studyName"], storage=f"sqlite:///{controller.workdir}/optuna.db"
    )
    assert sorted(t["number"] for t in front) == sorted(t.number for t in study.best_trials)


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_pruning_stops_bad_trials(
    cluster: Cluster, namespace: str, controller: ControllerProcess, pruner: str
) -> None:
    name = f"prune-{pruner}"
    _apply(
        cluster,
        namespace,
        _sweep(
            name,
            maxTrials=14,
            parallelism=2,
            algorithm={"sampler": "random", "seed": 5},
            earlyStopping={"pruner": pruner},
        ),
    )
    driver = Driver(cluster, namespace, name, controller.report_url, intermediate_steps=6)
    driver.run_until(lambda: _done(cluster, namespace, name), timeout=300)
    status = get(cluster, "fts", namespace, name)["status"]
    assert status["phase"] == "Succeeded"
    assert status["trials"]["pruned"] >= 1
    assert status["trials"]["pruned"] == len(driver.pruned_seen)
    assert status["trials"]["created"] == 14
    pruned = [t for t in driver.trials() if t["metadata"]["name"] in driver.pruned_seen]
    for t in pruned:
        assert t["status"]["phase"] == "Failed"
        assert any(c["reason"] == "TrialPruned" for c in t["status"]["conditions"])
        # the pruned trial's pods were stopped
        assert items(cluster, "jobs", namespace, f"kubetune.io/job={t['metadata']['name']}") == []


def test_report_endpoint_rejects_foreign_tokens(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _apply(cluster, namespace, _sweep("auth", maxTrials=2, parallelism=2))
    for trial in ("auth-0", "auth-1"):
        wait_for(lambda t=trial: items(cluster, "job", namespace, f"kubetune.io/job={t}"),
                 timeout=30, what=f"{trial}'s batch Job (its pods carry the token)")
    driver = Driver(cluster, namespace, "auth", controller.report_url)
    other = driver.token("auth-1")
    with pytest.raises(urllib.error.HTTPError) as err:
        driver.report("auth-0", 10, 1.0, token=other)
    assert err.value.code == 403
    assert driver.report("auth-0", 10, 1.0)["action"] == "continue"


def test_controller_sigkill_during_sweep_no_lost_or_duplicate_trials(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _apply(cluster, namespace, _sweep("durable", maxTrials=12, parallelism=3))
    driver = Driver(cluster, namespace, "durable", controller.report_url)
    rng = random.Random(11)
    kills = {"n": 0, "next": 2}

    def chaos() -> None:
        done = len(driver.ended)
        if kills["n"] < 4 and done >= kills["next"]:
            controller.kill()
            controller.start()
            kills["n"] += 1
            kills["next"] = done + rng.randint(1, 3)

    driver.run_until(lambda: _done(cluster, namespace, "durable"), timeout=300, on_tick=chaos)
    assert kills["n"] >= 3
    status = get(cluster, "fts", namespace, "durable")["status"]
    assert status["phase"] == "Succeeded"
    trials = driver.trials()
    numbers = sorted(int(t["metadata"]["labels"]["kubetune.io/trial"]) for t in trials)
    assert numbers == list(range(12))
    assert status["trials"]["created"] == 12 and status["trials"]["succeeded"] == 12
    jobs = [j["metadata"]["name"] for j in items(cluster, "jobs", namespace)]
    assert len(jobs) == len(set(jobs)) == 12


def test_failed_trials_past_limit_fail_the_sweep(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _apply(cluster, namespace, _sweep("fragile", maxTrials=10, parallelism=2, maxFailedTrials=2))
    driver = Driver(
        cluster, namespace, "fragile", controller.report_url, fail_trials=lambda n: True
    )
    driver.run_until(lambda: _done(cluster, namespace, "fragile"), timeout=180)
    obj = wait_phase(cluster, "fts", namespace, "fragile", "Failed", timeout=30)
    trials = obj["status"]["trials"]
    # 3 failures exceed maxFailedTrials=2; a trial still running then is stopped (failed too)
    assert 3 <= trials["failed"] <= 4 and trials["running"] == 0
    assert trials["created"] < 10  # no new trials after the limit
    described = cluster.kubectl("describe", "fts", "fragile", "-n", namespace).stdout
    assert "MaxFailedTrialsExceeded" in described


def test_editing_parallelism_and_max_trials_takes_effect(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _apply(cluster, namespace, _sweep("elastic", maxTrials=4, parallelism=1))
    driver = Driver(cluster, namespace, "elastic", controller.report_url)
    wait_for(lambda: len(driver.trials()) == 1, timeout=30)
    cluster.kubectl(
        "patch",
        "fts",
        "elastic",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"parallelism":3,"maxTrials":6}}',
    )
    wait_for(lambda: len(driver.trials()) == 3, timeout=30, what="parallelism raised to 3")
    driver.run_until(lambda: _done(cluster, namespace, "elastic"), timeout=180)
    assert get(cluster, "fts", namespace, "elastic")["status"]["trials"]["created"] == 6
    assert driver.max_running <= 3


TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "tie_word_embeddings": False,
}


def test_unreachable_budgets_are_refused_without_the_controller_reading_the_model(
    cluster: Cluster,
    namespace: str,
    controller: ControllerProcess,
) -> None:
    """The controller never reads the user's model or Secret (it is the most privileged
    pod): the first trial's pod reads config.json with its own credentials and announces it
    over its report link; from then on the sweep refuses unreachable budgets before launch.
    A trial refused in its own pod costs no failure budget either."""
    template = {
        **TEMPLATE,
        # an endpoint the controller could not even reach: nothing is read from there
        "model": {"uri": "s3://models/tiny"},
        "method": {"type": "lora", "rank": 8, "trainableParamPercent": 0.5},
        "storage": {"endpoint": "http://169.254.169.254"},
    }
    # ranks 16, 32 and 64 are out of reach at 0.5 % of this model (the solver's closest is
    # 1.0 %, 2.0 % and 3.9 %); 4 and 8 are reachable
    spec = _sweep(
        "budget",
        template=template,
        maxTrials=5,
        parallelism=1,
        maxFailedTrials=0,
        parameters=[{"name": "method.rank", "categorical": [4, 8, 16, 32, 64]}],
        algorithm={"sampler": "grid"},
    )
    _apply(cluster, namespace, spec)
    driver = Driver(cluster, namespace, "budget", controller.report_url, model_config=TINY_LLAMA)
    driver.run_until(lambda: _done(cluster, namespace, "budget"), timeout=180)

    status = get(cluster, "fts", namespace, "budget")["status"]
    rank_of = {
        t["metadata"]["name"]: json.loads(
            t["metadata"]["annotations"]["kubetune.io/trial-parameters"]
        )["method.rank"]
        for t in driver.trials()
    }
    launched = set(rank_of.values())
    unreachable = {16, 32, 64}
    # only the first trial can run before its pod has announced the model
    first = min(rank_of, key=lambda n: int(n.rsplit("-", 1)[1]))
    assert launched & unreachable <= {rank_of[first]}, rank_of
    assert {rank_of[n] for n in driver.refused_in_pod} <= {rank_of[first]}
    records = {r["parameters"]["method.rank"]: r for r in status["trialList"]}
    assert set(records) == {4, 8, 16, 32, 64}
    for rank in unreachable:
        assert records[rank]["state"] == "Failed" and "not reachable" in records[rank]["message"]
    assert {records[4]["state"], records[8]["state"]} == {"Succeeded"}
    # refusals, before launch or in the pod, cost no failure budget (maxFailedTrials 0)
    assert status["phase"] == "Succeeded", status
    assert (
        "BudgetInfeasible" in cluster.kubectl("describe", "fts", "budget", "-n", namespace).stdout
    )


def test_trials_whose_reports_never_arrive_are_named(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    """A pruner that never gets a value prunes nothing, silently: the sweep says which trial
    finished without one report reaching the controller, and where they should have gone."""
    _apply(cluster, namespace, _sweep("deaf", maxTrials=2, parallelism=2,
                                      earlyStopping={"pruner": "median"}))
    driver = Driver(cluster, namespace, "deaf", controller.report_url, intermediate_steps=0)
    driver.run_until(lambda: _done(cluster, namespace, "deaf"), timeout=120)

    def warned() -> str | None:
        events = cluster.kubectl(
            "get", "events", "-n", namespace, "--field-selector",
            "involvedObject.name=deaf,reason=ReportsMissing", "-o", "json").stdout
        msgs = [e["message"] for e in json.loads(events)["items"]]
        return "\n".join(msgs) if len(msgs) == 2 else None

    msgs = wait_for(warned, timeout=30, what="ReportsMissing events for both trials")
    assert "trial 0 (deaf-0)" in msgs and "trial 1 (deaf-1)" in msgs
    assert controller.report_url in msgs and "median pruner cannot act" in msgs
    # a trial that did report is not named
    _apply(cluster, namespace, _sweep("heard", maxTrials=1, parallelism=1,
                                      earlyStopping={"pruner": "median"}))
    Driver(cluster, namespace, "heard", controller.report_url, intermediate_steps=2).run_until(
        lambda: _done(cluster, namespace, "heard"), timeout=120)
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                             "involvedObject.name=heard,reason=ReportsMissing").stdout
    assert "ReportsMissing" not in events


# --- ownership: names the sweep needs, held by objects it does not own ---------------------
def _sweep_condition(cluster: Cluster, namespace: str, name: str, type_: str) -> dict | None:
    st = get(cluster, "fts", namespace, name).get("status") or {}
    return next((c for c in st.get("conditions", []) if c["type"] == type_), None)


def _owner_uids(obj: dict) -> list[str]:
    return [r["uid"] for r in obj["metadata"].get("ownerReferences") or []]


def test_trials_get_tokens_without_any_secret_in_the_namespace(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    """Report tokens derive from the controller's own key (HKDF per sweep uid): the sweep's
    namespace gets no Secret from kubetune, and a key someone planted under the old
    `<sweep>-report-key` name mints nothing the report endpoint accepts."""
    cluster.kubectl("create", "secret", "generic", "keyed-report-key", "-n", namespace,
                    "--from-literal=key=known-to-the-attacker-0123456789")
    _credentials(cluster, namespace)  # the test's own, as _apply makes it
    before = {s["metadata"]["name"] for s in items(cluster, "secret", namespace)}
    _apply(cluster, namespace, _sweep("keyed", maxTrials=1, parallelism=1))
    wait_for(lambda: items(cluster, "job", namespace, "kubetune.io/job=keyed-0"), timeout=40,
             what="trial 0's batch Job")
    after = {s["metadata"]["name"] for s in items(cluster, "secret", namespace)}
    assert after == before  # kubetune wrote no Secret to the namespace
    driver = Driver(cluster, namespace, "keyed", controller.report_url, intermediate_steps=1)
    assert driver.report("keyed-0", 1, 0.9)["action"] in ("continue", "prune")
    uid = get(cluster, "fts", namespace, "keyed")["metadata"]["uid"]
    planted = mint_token("known-to-the-attacker-0123456789", uid, 0)
    with pytest.raises(urllib.error.HTTPError) as refused:
        driver.report("keyed-0", 2, 0.1, token=planted)
    assert refused.value.code == 403


def test_a_forged_trial_label_is_no_trial_and_a_held_trial_name_is_a_name_conflict(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    """FineTuneJobs labelled `kubetune.io/sweep=forge, kubetune.io/trial=N` that the sweep
    does not own: never counted (not even a 'Succeeded' one with a perfect loss), never
    given the trial's report token; the one that holds trial 0's name blocks trial 0 with a
    NameConflict until it is deleted."""

    def forged(name: str, trial: int) -> dict:
        return {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {
                "name": name,
                "labels": {"kubetune.io/sweep": "forge", "kubetune.io/trial": str(trial)},
            },
            "spec": TEMPLATE,
        }

    _apply(cluster, namespace, forged("forge-0", 0))
    _apply(cluster, namespace, forged("forge-fake", 5))
    for name in ("forge-0", "forge-fake"):
        wait_for(lambda n=name: get(cluster, "job", namespace, f"{n}-a1"), timeout=30,
                 what=f"{name}'s Job")
    # a forged label is no trial: its pods get only their own progress token, which the
    # report endpoint refuses for the sweep's trial
    forged_token = pod_report_token(cluster, namespace, "forge-0")
    sweep_driver = Driver(cluster, namespace, "forge", controller.report_url)
    time.sleep(2)  # let the controller's own status writes settle, then forge a success
    cluster.kubectl(
        "patch", "ftj", "forge-fake", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {
            "phase": "Succeeded",
            "metrics": {"evalLoss": 0.0001},
            "artifact": {"uri": "s3://adapters/sweep/forge-fake/", "sha256": "0" * 64},
        }}),
    )
    _apply(cluster, namespace, _sweep("forge", maxTrials=2, parallelism=1))

    def conflict() -> dict | None:
        cond = _sweep_condition(cluster, namespace, "forge", "Created")
        return cond if cond and cond["reason"] == "NameConflict" else None

    cond = wait_for(conflict, timeout=30, what="Created=False NameConflict on the sweep")
    assert "FineTuneJob forge-0" in cond["message"]
    time.sleep(4)
    status = get(cluster, "fts", namespace, "forge")["status"]
    assert status["trials"].get("succeeded", 0) == 0 and "bestTrial" not in status
    held = get(cluster, "ftj", namespace, "forge-0")  # not adopted
    assert _owner_uids(held) == [] and "kubetune.io/component" not in held["metadata"]["labels"]
    assert get(cluster, "ftj", namespace, "forge-fake")["status"]["phase"] == "Succeeded"
    # the foreign object goes: the sweep creates its own trial 0
    cluster.kubectl("delete", "ftj", "forge-0", "-n", namespace)
    sweep_uid = get(cluster, "fts", namespace, "forge")["metadata"]["uid"]
    wait_for(lambda: _owner_uids(get(cluster, "ftj", namespace, "forge-0")) == [sweep_uid],
             timeout=40, what="the sweep's own trial 0")
    wait_for(
        lambda: (c := _sweep_condition(cluster, namespace, "forge", "Created"))
        and c["status"] == "True",
        timeout=30,
        what="Created=True",
    )
    status = get(cluster, "fts", namespace, "forge")["status"]
    assert status["trials"].get("succeeded", 0) == 0 and "bestTrial" not in status

    def own_token() -> str | None:
        try:
            token = pod_report_token(cluster, namespace, "forge-0")
        except AssertionError:  # no batch Job yet
            return None
        return token if token != forged_token else None

    wait_for(own_token, timeout=40, what="the sweep's trial 0's batch Job")
    with pytest.raises(urllib.error.HTTPError) as refused:
        sweep_driver.report("forge-0", 1, 0.5, token=forged_token)
    assert refused.value.code == 403
