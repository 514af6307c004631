"""Resume: a run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends;
damaged checkpoints are detected and the previous one is used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import write_jsonl
from tests.test_cli import assert_user_error, tl
from tuneloop.train import checkpoint

# A training process that sleeps after every step, so the test can kill it mid-run.
SLOW_TRAIN = """
import sys, time
from tuneloop.project import load_recipe
from tuneloop.train.run import train
train(load_recipe(sys.argv[1]), progress=lambda *a: time.sleep(float(sys.argv[2])))
"""


def write_recipe(tmp_path, tiny_model, classify_files, method: str = "lora") -> Path:
    train, test = classify_files
    recipe = {"base_model": str(tiny_model), "task": "classify",
              "data": {"train": str(train), "test": str(test)}, "baselines": [],
              "max_steps": 10, "epochs": 4, "batch_size": 4, "batch_tokens": 128, "learning_rate": 5e-3,
              "checkpoint_every": 3, "eval_every": 2, "lora": {"rank": 4, "dropout": 0.1}}
    if method == "dpo":  # preference pairs (tests/test_dpo.py's), scored on pairs
        from tests.test_dpo import pairs

        recipe.update(task="chat", method="dpo", batch_tokens=256, dpo={"beta": 0.5},
                      data={"train": str(write_jsonl(tmp_path / "pairs.jsonl", pairs(40, 1))),
                            "test": str(write_jsonl(tmp_path / "pairs-test.jsonl", pairs(8, 2)))})
    elif method == "distill":  # the base itself as the teacher: logit-level distillation
        recipe.update(method="distill", distill={"teacher": str(tiny_model)})
    elif method == "spans":  # a span head with a layer of its own (tests/test_spans.py's rows)
        from tests.test_spans import booking_rows

        recipe.update(task="extract", head="spans", span_context="encoder",
                      data={"train": str(write_jsonl(tmp_path / "b.jsonl", booking_rows(60, 1))),
                            "test": str(write_jsonl(tmp_path / "bt.jsonl", booking_rows(8, 2)))})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def only_run(ws: Path) -> Path:
    (run,) = (ws / "runs").iterdir()
    return run


@pytest.mark.parametrize("method", ["lora", "dpo", "distill", "spans"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model, classify_files,
                                                          method):
    """The same for every objective on the one training loop: SFT, DPO, distillation and a
    span head's tagging (its head file too)."""
    recipe = write_recipe(tmp_path, tiny_model, classify_files, method)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = tl("train", recipe, "--json", env={"TUNELOOP_HOME": str(whole)})
    assert done.returncode == 0, done.stderr

    env = {**os.environ, "TUNELOOP_HOME": str(killed)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, str(recipe), "0.3"], env=env)
    deadline = time.monotonic() + 300
    while not list(killed.glob("runs/*/checkpoints/step-000006")):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before step 6"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = only_run(killed)
    assert not (run_dir / "adapter").exists()  # it really died mid-run
    # Damage the newest checkpoint: resuming must detect it and start from step 3 instead.
    newest = run_dir / "checkpoints" / "step-000006" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])
    assert checkpoint.latest(run_dir / "checkpoints").name == "step-000003"

    resumed = tl("train", "--resume", run_dir.name, "--json", env={"TUNELOOP_HOME": str(killed)})
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["run_id"] == run_dir.name and result["steps"] == 10

    files = ["adapter_model.safetensors"] + (["span_head.safetensors"] if method == "spans" else [])
    for file in files:
        a = load_file(only_run(whole) / "adapter" / file)
        b = load_file(run_dir / "adapter" / file)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    if method == "spans":
        assert any(k.startswith("encoder.") for k in a) and a["weight"].abs().sum() > 0
    curves_a = json.loads((only_run(whole) / "curves.json").read_text())
    curves_b = json.loads((run_dir / "curves.json").read_text())
    assert [s for s, _ in curves_b["train"]] == list(range(1, 11))
    for kind in ("train", "validation"):
        torch.testing.assert_close(torch.tensor(curves_b[kind]), torch.tensor(curves_a[kind]),
                                   rtol=0, atol=1e-6)
    if method == "lora":
        again = tl("train", "--resume", run_dir.name, env={"TUNELOOP_HOME": str(killed)})
        assert_user_error(again, "has finished")


def test_damaged_or_partial_checkpoints_are_skipped(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.lm_head.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    folder = tmp_path / "ckpts"
    for step in (1, 2, 3):
        checkpoint.save(folder, model, optimizer, scheduler, step, step, keep=3)
    assert checkpoint.latest(folder).name == "step-000003"
    (folder / "step-000003" / "state.pt").unlink()  # a file gone
    assert checkpoint.latest(folder).name == "step-000002"
    meta = folder / "step-000002" / "meta.json"
    meta.write_text(meta.read_text().replace('"step": 2', '"step": 9'))  # a file altered
    assert checkpoint.latest(folder).name == "step-000001"
    (folder / ".tmp-step-000004").mkdir()  # a write that never finished is never a candidate
    assert checkpoint.latest(folder).name == "step-000001"


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, tiny_model, classify_files):
    recipe = write_recipe(tmp_path, tiny_model, classify_files)
    ws = tmp_path / "ws"
    env = {**os.environ, "TUNELOOP_HOME": str(ws)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, str(recipe), "5"], env=env)
    deadline = time.monotonic() + 300
    while not list(ws.glob("runs/*")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_id = only_run(ws).name
    assert_user_error(tl("train", "--resume", run_id, env={"TUNELOOP_HOME": str(ws)}),
                      "no intact checkpoint")
    assert_user_error(tl("train", env={"TUNELOOP_HOME": str(ws)}), "--resume RUN")
