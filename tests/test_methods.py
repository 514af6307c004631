"""Training methods on a tiny model: what trains, what stays frozen, and that each artifact is
loaded unchanged by evaluation and export."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.test_train_lora import recipe_for
from tuneloop.evaluate import evaluate
from tuneloop.models import load_artifact
from tuneloop.train.export import export
from tuneloop.errors import TuneloopError
from tuneloop.train.run import train


def base_state(tiny_model):
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model).state_dict().items()}


def test_full_fine_tuning_trains_every_weight_but_the_frozen_layers(tiny_model, classify_files, workspace):
    before = base_state(tiny_model)
    train_file, test_file = classify_files
    result = train(recipe_for(tiny_model, train_file, test_file, method="full", max_steps=4,
                              learning_rate=1e-3, full={"freeze_layers": 1}, baselines=[]),
                   workspace=workspace)
    assert result["artifact"].endswith("/model")
    after = AutoModelForCausalLM.from_pretrained(result["artifact"]).state_dict()  # plain transformers
    for name, tensor in before.items():
        frozen = name.startswith("model.layers.0.") or "embed_tokens" in name or name == "lm_head.weight"
        same = torch.equal(after[name], tensor)
        assert same == frozen, name  # tied lm_head = the frozen embeddings
    scored = evaluate(result["run_id"], test_file, workspace=workspace)
    assert scored["strategy"] == "fine-tuned" and scored["n"] == 12


def test_dora_trains_magnitudes_and_directions_only(tiny_model, classify_files, workspace):
    train_file, test_file = classify_files
    result = train(recipe_for(tiny_model, train_file, test_file, method="dora", max_steps=3,
                              baselines=[]), workspace=workspace)
    saved = load_file(f"{result['artifact']}/adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in saved) and any("lora_A" in k for k in saved)
    assert not any("base_layer" in k or "embed_tokens" in k for k in saved)
    lm, meta = load_artifact(Path(result["artifact"]))
    assert meta["method"] == "dora" and lm.peft_config["default"].use_dora


def wide_tiny_model(tiny_model: Path, folder: Path) -> Path:
    """The tiny model 64 wide: on CPUs with AVX-512 BF16, bitsandbytes packs 4-bit weights for
    its CPU kernel in blocks of 64 inputs and fails on narrower layers (no real model has one)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.copytree(tiny_model, folder)
    config = LlamaConfig.from_pretrained(folder)
    config.hidden_size, config.intermediate_size = 64, 128
    config.head_dim = 64 // config.num_attention_heads
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_qlora_trains_adapters_on_a_4bit_base(tiny_model, classify_files, workspace, tmp_path):
    import bitsandbytes as bnb

    from tuneloop.data.splits import load_splits
    from tuneloop.train.qlora import QLORA
    from tuneloop.train.sft import run_sft

    tiny_model = wide_tiny_model(tiny_model, tmp_path / "wide")
    train_file, test_file = classify_files
    # (head: none: three steps of the tiny model never beat its first validation, so a head's
    # run would keep step 1's adapters, still zero)
    recipe = recipe_for(tiny_model, train_file, test_file, method="qlora", max_steps=3,
                        baselines=[], head="none")
    out = run_sft(QLORA, recipe, load_splits(recipe.data, "classify"), tmp_path / "run")
    model = out["model"]
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # base held in 4 bits
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    result = train(recipe, workspace=workspace)  # its adapter evaluates on the plain base
    assert result["method"] == "qlora" and 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_qlora_keeps_the_unquantized_layers_in_their_loaded_dtype(tiny_model, classify_files,
                                                                  tmp_path):
    """On a GPU the base loads in bf16: its embeddings, norms and head stay bf16 (no float32
    copies of a 128k-vocabulary head); only the adapters train, in float32."""
    from transformers import BitsAndBytesConfig

    from tuneloop import models
    from tuneloop.train.plan import make_plan
    from tuneloop.train.qlora import QLORA

    folder = wide_tiny_model(tiny_model, tmp_path / "wide")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = models.load_model(str(folder), dtype=torch.bfloat16, quantization=config)
    train_file, test_file = classify_files
    recipe = recipe_for(folder, train_file, test_file, method="qlora", baselines=[])
    plan = make_plan(recipe, 3, 1, 64, 100.0, 1000, 1e-4, batch_size=8, batch_tokens=256)
    model = QLORA.prepare(model, recipe, plan)
    frozen = {n: p.dtype for n, p in model.named_parameters()
              if not p.requires_grad and p.dtype.is_floating_point}
    assert any("embed_tokens" in n for n in frozen) and any("norm" in n for n in frozen)
    assert set(frozen.values()) == {torch.bfloat16}, frozen
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)


def test_export_merge_gives_the_same_outputs_as_base_plus_adapter(tiny_model, classify_files,
                                                                  workspace, tmp_path):
    train_file, test_file = classify_files
    result = train(recipe_for(tiny_model, train_file, test_file, max_steps=4, baselines=[]),
                   workspace=workspace)
    merged = export(result["run_id"], tmp_path / "merged", merge=True, workspace=workspace)
    adapter = export(result["run_id"], tmp_path / "adapter", workspace=workspace)
    assert merged["kind"] == "model" and adapter["kind"] == "adapter"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in plain.state_dict())
    peft_model, _ = load_artifact(Path(result["artifact"]))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits,
                                   peft_model(input_ids=ids.to(peft_model.device)).logits.float().cpu(),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(TuneloopError, match="already exists"):
        export(result["run_id"], tmp_path / "merged", merge=True, workspace=workspace)
