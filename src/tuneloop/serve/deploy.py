"""Deployments: a model name that a tenant calls, pointing at a run. Promotion is evidence-based:
a run is deployed only if it passed its fine-tune gate and beats the run it replaces on the same
test set (unless forced); every change, and its reason, is an event in the registry."""

from __future__ import annotations

import re

from sqlalchemy import select

from tuneloop.errors import TuneloopError
from tuneloop.serve.auth import ensure_tenant
from tuneloop.store import Evaluation, Registry, Run, utcnow
from tuneloop.store.serving import Deployment, DeploymentEvent
from tuneloop import methods

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,255}$")


def headline(run: Run) -> str:
    """The metric promotion compares for a run."""
    gate = (run.metrics or {}).get("gate")
    if gate:
        return gate["metric"]
    return methods.headline(run.method, run.task)


def _score_on(registry: Registry, run: Run, dataset: str | None, metric: str) -> float | None:
    """The run's latest `metric` on test dataset `dataset`, from its evaluations."""
    with registry.session() as s:
        rows = s.scalars(select(Evaluation).where(Evaluation.run_id == run.id,
                                                  Evaluation.dataset == dataset)
                         .order_by(Evaluation.created.desc())).all()
    for row in rows:
        if metric in row.metrics:
            return row.metrics[metric]
    return None


def check_promotion(registry: Registry, run: Run, current: Run | None) -> str:
    """Why `run` may replace `current`; raises TuneloopError naming what is missing if not."""
    if run.status != "done" or not run.adapter_path:
        raise TuneloopError(f"run {run.id} is {run.status}; only finished runs can be deployed")
    gate = (run.metrics or {}).get("gate")
    if gate is None:
        raise TuneloopError(f"run {run.id} has no evaluation gate (it was trained without a test "
                            "set or baselines); deploy it with --force to skip the evidence")
    if not gate["passed"]:
        raise TuneloopError(
            f"run {run.id} did not pass its gate: {gate['metric']} {gate['run_value']:.3f} vs best "
            f"baseline {gate['best_baseline']} {gate['best_baseline_value']:.3f} (margin "
            f"{gate['margin']}); use --force to deploy anyway")
    reason = f"gate passed: {gate['metric']} +{gate['gain']:.3f} over {gate['best_baseline']}"
    if current is None or current.id == run.id:
        return reason
    metric = headline(run)
    new = _score_on(registry, run, run.test_dataset, metric)
    old = _score_on(registry, current, run.test_dataset, metric)
    if new is None or old is None:
        raise TuneloopError(
            f"run {current.id} (deployed now) has no {metric} on run {run.id}'s test set "
            f"{run.test_dataset}; score it first (`tuneloop eval {current.id} --data TEST_FILE`) "
            "or use --force")
    if new <= old:
        raise TuneloopError(f"run {run.id} does not beat the deployed run {current.id} on "
                            f"{run.test_dataset}: {metric} {new:.3f} <= {old:.3f}; use --force "
                            "to deploy anyway")
    return reason + f"; beats {current.id} on {metric}: {new:.3f} > {old:.3f}"


def deploy(registry: Registry, name: str, run_id: str, tenant: str = "default",
           force: bool = False, reason: str | None = None) -> DeploymentEvent:
    """Point deployment `name` of `tenant` at a run (creating it), after the promotion checks."""
    if not NAME.match(name):
        raise TuneloopError(f"deployment name '{name}' is not valid: letters, digits and . _ : - "
                            "only, starting with a letter or digit")
    ensure_tenant(registry, tenant)
    run = registry.get_run(run_id)
    current = _current(registry, name, tenant)
    if force:
        if run.status != "done" or not run.adapter_path:
            raise TuneloopError(f"run {run.id} is {run.status}; only finished runs can be deployed")
        why = reason or "forced"
    else:
        why = reason or check_promotion(registry, run, current)
    return _point(registry, name, tenant, run.id, current.id if current else None, "deploy",
                  force, why)


def rollback(registry: Registry, name: str, tenant: str = "default") -> DeploymentEvent:
    """Point `name` back at the run it served before the current one."""
    stack = deployed_history(registry, name, tenant)
    if len(stack) < 2:
        raise TuneloopError(f"deployment '{name}' has no earlier run to roll back to")
    return _point(registry, name, tenant, stack[-2], stack[-1], "rollback", False,
                  f"rolled back from {stack[-1]}")


def deployed_history(registry: Registry, name: str, tenant: str) -> list[str]:
    """Runs of a deployment as a stack: a deploy pushes its run, a rollback pops one."""
    return run_stack(events(registry, name, tenant))


def run_stack(history: list[DeploymentEvent]) -> list[str]:
    """The stack of runs that a deployment's events, oldest first, leave."""
    stack: list[str] = []
    for event in history:
        if event.action == "deploy":
            stack.append(event.run_id)
        elif event.action == "rollback" and stack:
            stack.pop()
    return stack


def events(registry: Registry, name: str | None = None, tenant: str | None = None) -> list[DeploymentEvent]:
    with registry.session() as s:
        q = select(DeploymentEvent).order_by(DeploymentEvent.id)
        if name:
            q = q.where(DeploymentEvent.name == name)
        if tenant:
            q = q.where(DeploymentEvent.tenant == tenant)
        return list(s.scalars(q))


def deployments(registry: Registry, tenant: str | None = None) -> list[Deployment]:
    with registry.session() as s:
        q = select(Deployment).order_by(Deployment.name)
        if tenant:
            q = q.where(Deployment.tenant == tenant)
        return list(s.scalars(q))


def _current(registry: Registry, name: str, tenant: str) -> Run | None:
    with registry.session() as s:
        row = s.get(Deployment, name)
        if row is not None and row.tenant != tenant:
            raise TuneloopError(f"deployment name '{name}' is taken by another tenant; choose another")
        return s.get(Run, row.run_id) if row else None


def _point(registry, name, tenant, run_id, previous, action, forced, reason) -> DeploymentEvent:
    """Move the deployment and record the event in one transaction."""
    with registry.session() as s, s.begin():
        row = s.get(Deployment, name)
        if row is None:
            s.add(Deployment(name=name, tenant=tenant, run_id=run_id))
        else:
            row.run_id, row.updated = run_id, utcnow()
        event = DeploymentEvent(name=name, tenant=tenant, action=action, run_id=run_id,
                                previous_run_id=previous, forced=forced, reason=reason)
        s.add(event)
    return event
