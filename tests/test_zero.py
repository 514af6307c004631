"""DeepSpeed ZeRO-2 and ZeRO-3 over two CPU processes: the checks FSDP passes
(tests/test_distributed.py), in a file of their own so two test workers share the launches."""

from __future__ import annotations

import pytest

from tests.test_distributed import sharded_resume_is_exact, sharded_run_matches_one_process
from tuneloop.errors import TuneloopError
from tuneloop.train import checkpoint


def test_two_process_zero2_training_matches_one_process(tiny_model, classify_files, workspace):
    sharded_run_matches_one_process("lora", "zero2", tiny_model, classify_files, workspace)


def test_a_zero3_run_matches_one_process_and_resumes_as_if_never_stopped(
        tiny_model, classify_files, tmp_path):
    whole = sharded_resume_is_exact("zero3", tiny_model, classify_files, tmp_path)
    ckpt = whole / "checkpoints" / "step-000003"
    manifest = checkpoint.verify(ckpt) and (ckpt / "manifest.json").read_text()
    # DeepSpeed's optimizer partitions, one per rank, are part of the verified checkpoint
    assert manifest and manifest.count("optim_states.pt") == 2
    with pytest.raises(TuneloopError, match="sharded with DeepSpeed ZeRO-3; resume it with "
                                            "--deepspeed zero3"):
        checkpoint.restore(ckpt, None, None, None, checkpoint.WHOLE)
