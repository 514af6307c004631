"""Distillation on the tiny model: the KL term, teacher answers as targets, and a student that
moves towards its teacher while the teacher and the base stay as they were."""

from __future__ import annotations

import json

import pytest
import torch

from tuneloop.errors import TuneloopError
from tuneloop.project import recipe_from_dict
from tuneloop.train.distill import _kl
from tuneloop.train.run import train


def test_kl_is_zero_for_the_same_distribution_and_positive_otherwise():
    torch.manual_seed(0)
    teacher = torch.randn(6, 50)
    same = (_kl(teacher.clone(), teacher, None, 1.0), _kl(teacher.clone(), teacher, 5, 2.0))
    for kl in same:  # one value per answer position
        assert kl.shape == (6,) and float(kl.abs().max()) == pytest.approx(0.0, abs=1e-5)
    student = torch.randn(6, 50, requires_grad=True)
    full, top = _kl(student, teacher, None, 1.0), _kl(student, teacher, 5, 1.0)
    assert bool((full > 0).all()) and bool((top > 0).all())
    # The top-k form is a lower bound of the full KL at every position (it merges the other
    # tokens into one).
    assert bool((top <= full + 1e-5).all())
    top.sum().backward()
    assert student.grad.abs().sum() > 0


def recipe(tiny_model, train_file, test_file, **extra):
    return recipe_from_dict({"base_model": str(tiny_model), "task": "classify", "baselines": [],
                             "data": {"train": str(train_file), "test": str(test_file)},
                             "epochs": 2, "learning_rate": 5e-3, "batch_size": 8, "batch_tokens": 256,
                             **extra})


def test_distilled_student_moves_towards_its_teacher(tiny_model, classify_files, workspace):
    from tuneloop.models import load_artifact
    from tuneloop.store import Registry

    train_file, test_file = classify_files
    teacher_run = train(recipe(tiny_model, train_file, test_file, epochs=3, head="none",
                               forgetting={"enabled": False}), workspace=workspace)
    teacher_file = workspace / "runs" / teacher_run["run_id"] / "adapter" / \
        "adapter_model.safetensors"
    teacher_bytes = teacher_file.read_bytes()

    results, phases = {}, {}
    for mode in ("sequence", "logits"):
        phases[mode] = []
        results[mode] = train(recipe(tiny_model, train_file, test_file, method="distill",
                                     max_steps=12, forgetting={"enabled": False},
                                     distill={"teacher": teacher_run["run_id"], "mode": mode,
                                              "top_k": None, "weight": 1.0}),
                              workspace=workspace, on_phase=phases[mode].append)
    # The second student's teacher answers come from the request cache, not a second pass.
    assert not any("cached" in p for p in phases["sequence"])
    assert any(p.endswith("teacher answers were cached from an earlier run")
               and p.split(" of ")[0] == p.split(" of ")[1].split()[0] for p in phases["logits"])
    assert teacher_file.read_bytes() == teacher_bytes  # the teacher did not train
    for mode, result in results.items():
        assert result["method"] == "distill" and result["distill"]["mode"] == mode
        assert result["final_val_kl"] >= 0
        meta = json.loads((workspace / "runs" / result["run_id"] / "adapter" /
                           "tuneloop.json").read_text())
        assert meta["method"] == "distill"
        model, _ = load_artifact(workspace / "runs" / result["run_id"] / "adapter")
        b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert b and all(p.abs().sum() > 0 for p in b)  # adapters trained from zero
    # Matching the whole distribution gets closer to the teacher than its answers alone.
    assert results["logits"]["final_val_kl"] < results["sequence"]["final_val_kl"]
    run = Registry.open(workspace).get_run(results["logits"]["run_id"])
    assert run.recipe["distill"]["teacher"] == teacher_run["run_id"]


def test_distill_needs_a_teacher_and_one_process(tiny_model, classify_files, workspace):
    train_file, test_file = classify_files
    with pytest.raises(TuneloopError, match="distill: {teacher: RUN_ID}"):
        recipe(tiny_model, train_file, test_file, method="distill")
    with pytest.raises(TuneloopError, match="one process"):
        train(recipe(tiny_model, train_file, test_file, method="distill",
                     distill={"teacher": "run-x"}), workspace=workspace, processes=2)


def test_a_teacher_that_decides_with_a_label_head_is_refused(tiny_model, classify_files,
                                                            workspace):
    """A classifier trained with a label head was never trained to write its labels: its
    written answers would teach nonsense, so it is refused as a teacher, with the fix named."""
    train_file, test_file = classify_files
    headed = train(recipe(tiny_model, train_file, test_file, max_steps=2, head="labels",
                          forgetting={"enabled": False}), workspace=workspace)
    with pytest.raises(TuneloopError, match="label head .* head: none"):
        train(recipe(tiny_model, train_file, test_file, method="distill", max_steps=2,
                     distill={"teacher": headed["run_id"]}), workspace=workspace)
