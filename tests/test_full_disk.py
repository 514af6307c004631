"""A disk that fills up: a checkpoint that cannot be written is a clear error that leaves the
previous checkpoint intact and no partial one behind; an upload that cannot be stored is a 507
that keeps nothing, and the server takes the next one once there is room. The disk is a small
tmpfs (mounting needs root: skipped elsewhere)."""

from __future__ import annotations

import contextlib
import json
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import make_rows
from tuneloop.errors import TuneloopError
from tuneloop.train import checkpoint


@contextlib.contextmanager
def small_disk(folder, size: str):
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder, leave: int = 4096) -> None:
    """Take all of the disk's free space but `leave` bytes."""
    import shutil

    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_checkpoint_on_a_full_disk_is_a_clear_error_and_the_previous_one_stays(tiny_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    trainable = list(model.parameters())[:4]
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i < 4)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with small_disk(tmp_path / "disk", "8m") as disk:
        folder = disk / "checkpoints"
        first = checkpoint.save(folder, model, optimizer, scheduler, step=1, position=1)
        assert checkpoint.latest(folder) == first
        fill(disk)
        with pytest.raises(TuneloopError, match="no space left.*step 2.*step-000001. is intact"):
            checkpoint.save(folder, model, optimizer, scheduler, step=2, position=2)
        assert sorted(p.name for p in folder.iterdir()) == ["step-000001"]  # no partial one
        assert checkpoint.latest(folder) == first and checkpoint.verify(first)
        (disk / "filler").unlink()
        assert checkpoint.save(folder, model, optimizer, scheduler, step=2, position=2).name == "step-000002"


def test_an_upload_to_a_full_disk_is_refused_and_keeps_nothing(tiny_model, tmp_path):
    import httpx

    from tests.conftest import two_tenant_server

    with small_disk(tmp_path / "ws", "2m") as disk:
        with two_tenant_server(tiny_model, disk, deployed=False, worker=False) as srv:
            headers = {"authorization": f"Bearer {srv['keys']['acme']}"}
            rows = [{"messages": [{"role": "user", "content": r["text"] + " " + "x" * 400},
                                  {"role": "assistant", "content": r["label"]}]}
                    for r in make_rows(4400, seed=1)]
            big = "".join(json.dumps(r) + "\n" for r in rows).encode()
            assert len(big) > 2 * 2**20
            with httpx.Client(base_url=srv["url"], headers=headers, timeout=60) as c:
                reply = c.post("/v1/files", data={"purpose": "fine-tune"},
                               files={"file": ("big.jsonl", big)})
                assert reply.status_code == 507, reply.text
                assert reply.json()["error"]["code"] == "insufficient_storage"
                assert list((disk / "ws" / "files").iterdir()) == []  # nothing half-written kept
                small = "".join(json.dumps(r) + "\n" for r in rows[:20]).encode()
                ok = c.post("/v1/files", data={"purpose": "fine-tune"},
                            files={"file": ("small.jsonl", small)})
                assert ok.status_code == 200, ok.text
                assert c.get("/v1/files").json()["data"][0]["filename"] == "small.jsonl"
