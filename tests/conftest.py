"""Shared fixtures: a tiny Llama-shaped model with a tiny tokenizer, built in the test session."""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LABELS = ["card_lost", "exchange_rate", "top_up"]
TEMPLATES = {
    "card_lost": ["i lost my card {}", "my card was stolen {}", "where is my card {}"],
    "exchange_rate": ["what is the rate for {}", "exchange rate to {} please", "convert to {}"],
    "top_up": ["top up failed {}", "cannot add money {}", "my top up is pending {}"],
}
WORDS = ["today", "yesterday", "again", "now", "euro", "dollar", "pound", "yen", "help", "fast"]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        text = rng.choice(TEMPLATES[label]).format(" ".join(rng.sample(WORDS, 2)))
        rows.append({"text": f"{text} {i}", "label": label})
    return rows


def base_parameters(model_path) -> dict:
    """name -> a copy of each parameter of the base model at `model_path`, as it loads: what
    `assert_base_unchanged` compares a trained model against."""
    from transformers import AutoModelForCausalLM

    return {n: p.detach().clone()
            for n, p in AutoModelForCausalLM.from_pretrained(model_path).named_parameters()}


def assert_base_unchanged(model, before: dict, trained) -> None:
    """Every parameter of the (PEFT-wrapped) model that is not in `trained` equals the base
    model's parameter of the same name in `before` (name -> tensor): only the adapter and
    the head moved."""
    import torch

    for name, p in model.named_parameters():
        base = name.replace("base_model.model.", "").replace(".base_layer", "")
        if name not in trained and base in before:
            assert torch.equal(p.detach(), before[base]), name


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pytest_collection_modifyitems(config, items):
    """The longest files first: `make test` runs every test in one pytest-xdist run with
    --dist loadfile --no-loadscope-reorder, which hands whole files to the workers in this
    order, so the slow SmolLM2 files start at once beside the fast ones instead of after them
    (or last, as a tail). Files with more slow tests first, then files with more tests; a
    file's own order is kept."""
    slow, count = Counter(), Counter()
    for item in items:
        count[item.path] += 1
        slow[item.path] += bool(item.get_closest_marker("slow"))
    items.sort(key=lambda item: (-slow[item.path], -count[item.path], str(item.path)))


@pytest.fixture(autouse=True)
def threads_per_test(request, monkeypatch):
    """Tests outside the slow set work on a hidden-32 model, where a second intra-op thread
    only adds synchronisation: on two cores shared with a worker subprocess or another job,
    OpenMP's spinning threads made a 30-second test take over three minutes. One thread here
    and in the subprocesses the test starts. The slow SmolLM2 tests share the machine's cores
    among the pytest-xdist workers running at once (all of them when run alone)."""
    import torch

    threads = 1
    if request.node.get_closest_marker("slow"):
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        threads = max(1, (os.cpu_count() or 1) // workers)
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 Llama with a byte-level BPE tokenizer and a ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-model")
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["text"] for r in make_rows(300)] + LABELS + ["system user assistant helpful {}:\",_"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def workspace(tmp_path, monkeypatch) -> Path:
    """An empty workspace for the registry and run artifacts."""
    ws = tmp_path / "ws"
    monkeypatch.setenv("TUNELOOP_HOME", str(ws))
    return ws


@pytest.fixture()
def classify_files(tmp_path) -> tuple[Path, Path]:
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(60, seed=1))
    test = write_jsonl(tmp_path / "test.jsonl", [dict(r, text=r["text"] + " t") for r in make_rows(12, seed=2)])
    return train, test


DB_KINDS = ["sqlite"] + (["pg"] if os.environ.get("TUNELOOP_TEST_PG_URL") else [])


def fresh_db_url(kind: str, folder: Path) -> str:
    """A registry URL with an empty database: a new SQLite file, or the test PostgreSQL
    database ($TUNELOOP_TEST_PG_URL, set by .ci/run) with every table dropped. Under
    pytest-xdist each worker has its own schema of that database, so workers never drop
    each other's tables."""
    if kind == "sqlite":
        return f"sqlite:///{folder / 'registry.db'}"
    import sqlalchemy as sa

    url = sa.make_url(os.environ["TUNELOOP_TEST_PG_URL"])
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        with sa.create_engine(url).begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{worker}"'))
        url = url.update_query_dict({"options": f"-csearch_path={worker}"})
    engine = sa.create_engine(url)
    md = sa.MetaData()
    md.reflect(engine)
    md.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS _migrations"))
    engine.dispose()
    return url.render_as_string(hide_password=False)


@contextlib.contextmanager
def two_tenant_server(tiny_model: Path, folder: Path, db_kind: str = "sqlite",
                      deployed: bool = True, recipe: dict | None = None, **settings):
    """The real server on loopback for tenants acme and globex (a key each, the tiny base
    allowed); with `deployed`, each has a LoRA run of the tiny base deployed as
    <tenant>-intents (`recipe`: more recipe keys for those runs). Yields {"url", "keys",
    "registry", "base", "folder", "runs"}."""
    from tests.test_train_lora import recipe_for
    from tuneloop.serve.app import Settings, running
    from tuneloop.serve.auth import create_key
    from tuneloop.serve.deploy import deploy
    from tuneloop.store import Registry
    from tuneloop.train.run import train

    saved = {k: os.environ.get(k) for k in ("TUNELOOP_DB_URL", "TUNELOOP_HOME")}
    os.environ["TUNELOOP_DB_URL"] = fresh_db_url(db_kind, folder)
    os.environ["TUNELOOP_HOME"] = str(folder / "ws")
    try:
        registry = Registry.open(folder / "ws")
        train_file = write_jsonl(folder / "train.jsonl", make_rows(30, seed=1))
        test_file = write_jsonl(folder / "test.jsonl", make_rows(6, seed=2))
        keys, runs = {}, {}
        for tenant, seed in (("acme", 0), ("globex", 1)):
            if deployed:
                run = train(recipe_for(tiny_model, train_file, test_file, max_steps=2, seed=seed,
                                       baselines=[], forgetting={"enabled": False},
                                       **(recipe or {})),
                            workspace=folder / "ws")
                deploy(registry, f"{tenant}-intents", run["run_id"], tenant, force=True)
                runs[tenant] = run
            keys[tenant] = create_key(registry, tenant, bases=[str(tiny_model)])[1]
        with running(Settings(workspace=folder / "ws", bases=[str(tiny_model)],
                              **settings)) as url:
            yield {"url": url, "keys": keys, "registry": registry, "base": str(tiny_model),
                   "folder": folder, "runs": runs}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
