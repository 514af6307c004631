"""Synthetic labels from a teacher: does a student with 10 gold rows per intent gain from them?

    python bench/synth_banking77.py --data ../shared/data/banking77

Shared banking77 (77 intents, 35-39 training rows each, in rank-key order). Per intent:
the first 10 rows are the student's gold set; the next 15 join them to train the teacher
(25 per intent: a LoRA run of the bundled model); the remaining rows (up to 14 per intent)
lose their labels and are labelled by the teacher with `tuneloop synth`. The teacher never
trained on those rows, so its labels are honest predictions, not remembered answers. Two
students are then trained the same way (LoRA, 2 epochs): on the gold rows alone, and on the
gold rows plus the synthetic labels; all three models are scored on the shared 385-row test
set. Stages are cached in bench/out/synth_banking77/ (state.json), so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from tuneloop.project import recipe_from_dict
from tuneloop.train.run import train

ROOT = Path(__file__).resolve().parents[1]
GOLD, TEACHER_EXTRA = 10, 15


def split(data: Path, out: Path) -> dict[str, Path]:
    """gold / teacher / unlabeled files, by each row's rank within its intent."""
    rows = [json.loads(line) for line in (data / "train.jsonl").open()]
    seen: dict[str, int] = {}
    parts: dict[str, list] = {"gold": [], "teacher": [], "unlabeled": []}
    for row in rows:
        rank = seen[row["label"]] = seen.get(row["label"], 0) + 1
        if rank <= GOLD:
            parts["gold"].append(row)
            parts["teacher"].append(row)
        elif rank <= GOLD + TEACHER_EXTRA:
            parts["teacher"].append(row)
        else:
            parts["unlabeled"].append({"text": row["text"]})
            parts.setdefault("unlabeled_gold", []).append(row)
    paths = {}
    for name, part in parts.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def run(name: str, train_path: Path, test: Path, ws: Path, epochs: float) -> dict:
    recipe = recipe_from_dict({"task": "classify", "name": name, "epochs": epochs,
                               "baselines": [], "data": {"train": str(train_path),
                                                         "test": str(test)}})
    started = time.perf_counter()
    result = train(recipe, workspace=ws, on_phase=lambda p: print(f"[{name}] {p}", flush=True))
    return {"run_id": result["run_id"], "accuracy": result["accuracy"],
            "macro_f1": result["macro_f1"], "rows": result.get("train_rows"),
            "train_tokens": result["train_tokens"], "train_s": result["train_s"],
            "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "banking77")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--synth-epochs", type=float, default=1.0,
                        help="epochs of the gold+synthetic student: one pass over 2.4x the rows "
                        "is about the tokens of two passes over the gold rows")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "synth_banking77")
    parser.add_argument("--stage", choices=["teacher", "all"], default="all")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    ws = out / "workspace"
    os.environ["TUNELOOP_HOME"] = str(ws)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}

    def save():
        state_path.write_text(json.dumps(state, indent=2, default=str))

    paths = split(args.data, out)
    test = args.data / "test.jsonl"
    if "teacher" not in state:
        state["teacher"] = run("b77-teacher", paths["teacher"], test, ws, args.epochs)
        save()
    if args.stage == "teacher":
        return
    if "synth" not in state:
        state["synth"] = label(paths, test, state["teacher"]["run_id"], ws)
        save()
    if "gold_only" not in state:
        state["gold_only"] = run("b77-gold", paths["gold"], test, ws, args.epochs)
        save()
    if "gold_synth" not in state:
        state["gold_synth"] = run("b77-gold+synth", Path(state["synth"]["train"]), test, ws,
                                  args.synth_epochs)
        save()
    state["device"] = f"{os.cpu_count()} CPU cores"
    save()
    print(table(state))


def label(paths: dict[str, Path], test: Path, teacher: str, ws: Path) -> dict:
    """`tuneloop synth` in label mode; how often the teacher's labels match the hidden gold."""
    from tuneloop.synth.recipe import SynthRecipe
    from tuneloop.synth.run import synthesize

    recipe = SynthRecipe.model_validate({
        "name": "b77-synth", "task": "classify", "mode": "label", "teacher": {"run": teacher},
        "inputs": [{"path": str(paths["unlabeled"])}], "seeds": [{"path": str(paths["gold"])}],
        "include_seeds": True, "check_against": [str(test)], "report": {"model": None}})
    started = time.perf_counter()
    version = synthesize(recipe, ws, progress=lambda m: print(f"[synth] {m}", flush=True))
    wall = time.perf_counter() - started
    gold = {json.loads(line)["text"]: json.loads(line)["label"]
            for line in paths["unlabeled_gold"].open()}
    rows = [json.loads(line) for line in version.path("train").open()]
    synthetic = [r for r in rows if r["text"] in gold]
    lineage = version.report["lineage"]
    return {"version": version.id, "train": str(version.path("train")), "rows": len(rows),
            "offered": lineage["offered"], "synthetic": len(synthetic),
            "dropped": lineage["dropped"], "usage": lineage["usage"], "wall_s": wall,
            "label_accuracy": sum(r["label"] == gold[r["text"]] for r in synthetic)
            / max(1, len(synthetic))}


def table(state: dict) -> str:
    t, s, a, b = state["teacher"], state["synth"], state["gold_only"], state["gold_synth"]
    lines = [f"## synth_banking77 ({time.strftime('%Y-%m-%d')}, {state['device']})", "",
             "Shared banking77, 77 intents, SmolLM2-135M-Instruct LoRA, scored on the shared "
             "385-row test set. The teacher and the gold-only student train 2 epochs; the "
             "gold+synthetic student 1 epoch over 2.4x the rows (a similar token budget).",
             f"The teacher (25 gold rows per intent) labelled {s['offered']} held-back rows it "
             f"never saw with `tuneloop synth` in {s['wall_s']:.0f} s ({s['usage']['requests']} "
             f"requests, {s['usage']['prompt_tokens']} prompt + "
             f"{s['usage']['completion_tokens']} completion tokens); {s['synthetic']} kept "
             f"(dropped: {s['dropped'] or 'none'}); its labels agree with the hidden gold "
             f"labels on {s['label_accuracy']:.1%} of them.", "",
             "| model | training rows | accuracy | macro-F1 | train tokens | train s |",
             "|---|---|---|---|---|---|"]
    for name, r, rows in (("teacher (25 gold / intent)", t, "1,925"),
                          ("student: 10 gold / intent", a, "770"),
                          ("student: 10 gold / intent + synthetic labels", b, f"{s['rows']:,}")):
        lines.append(f"| {name} | {rows} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                     f"{r['train_tokens']:,} | {r['train_s']:.0f} |")
    gain = b["accuracy"] - a["accuracy"]
    lines += ["", f"Synthetic labels: accuracy {gain:+.3f} for the student "
              f"({a['accuracy']:.3f} → {b['accuracy']:.3f})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
