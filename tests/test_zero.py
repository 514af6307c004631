"""DeepSpeed ZeRO-2 and ZeRO-3 over two CPU processes: the checks FSDP passes
(tests/test_distributed.py), in a file of their own so two test workers share the launches."""

from __future__ import annotations

import pytest

from tests.test_distributed import sharded_resume_is_exact, sharded_run_matches_one_process


@pytest.mark.parametrize("method,sharding", [("lora", "zero2"), ("full", "zero3")])
def test_two_process_zero_training_matches_one_process(method, sharding, tiny_model,
                                                       classify_files, workspace):
    sharded_run_matches_one_process(method, sharding, tiny_model, classify_files, workspace)


def test_a_zero3_run_resumes_from_its_checkpoint_as_if_never_stopped(tiny_model, classify_files,
                                                                      tmp_path):
    sharded_resume_is_exact("zero3", tiny_model, classify_files, tmp_path)
