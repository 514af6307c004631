#!/usr/bin/env bash
# The GPU benches in one run, for a CUDA machine that has PyTorch, transformers and accelerate
# but no package index: the other packages travel as wheels (.gpu/whl, pure-Python or cp312)
# and folders (.gpu/site: bitsandbytes with its CUDA 13 library only), the bundled model as its
# config and tokenizer (.gpu/smollm2: throughput does not depend on the weights, which are
# drawn at random here). `bench/gpu.sh prepare` fills .gpu/ on a machine with the package
# index and the .venv; `bench/gpu.sh` runs on the GPU machine and writes to $OUT.
#
#   bench/gpu.sh prepare                       # here
#   OUT=/tmp/out bench/gpu.sh                  # there (device: carry .gpu)
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    site=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
    rm -rf .gpu && mkdir -p .gpu/whl .gpu/site .gpu/smollm2
    grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
    version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
    wheels=""
    for p in pydantic pydantic-core annotated-types typing-inspection sqlalchemy trl datasets \
             dill multiprocess peft; do wheels="$wheels $p==$(version $p)"; done
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/whl $wheels
    cp -r "$site/bitsandbytes" "$site"/bitsandbytes-*.dist-info .gpu/site/
    find .gpu/site/bitsandbytes -name "*.so" ! -name "*cuda130*" -delete
    find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
    model=$(.venv/bin/tuneloop models prepare smollm2-135m-instruct | awk '{print $2}')
    (cd "$model" && cp config.json generation_config.json tokenizer* chat_template.jinja \
        "$OLDPWD/.gpu/smollm2/")
    du -sh .gpu
    exit 0
fi

OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TUNELOOP_CACHE=/tmp/tuneloop-cache TUNELOOP_HOME=/tmp/tuneloop-home
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, trl, bitsandbytes; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, \
'bitsandbytes', bitsandbytes.__version__)"
model=$TUNELOOP_CACHE/models/smollm2-135m-instruct
mkdir -p "$model" && cp .gpu/smollm2/* "$model/"
python3 - "$model" <<'EOF'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
config = AutoConfig.from_pretrained(sys.argv[1])
AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(sys.argv[1])
EOF
# First the issue's figure (135M: tuneloop padded and packed against TRL), then the shapes.
# SKIP: throughput configurations left out; SHAPES_S=0 leaves out the shapes.
timeout "${THROUGHPUT_S:-240}" python3 bench/train_throughput.py --steps 40 \
    --skip ${SKIP:-trl-defaults} --timeout "${CONFIG_S:-150}" --out /tmp/throughput 2>&1 \
    | grep -v "Warning\|warn(\|it/s\]\|examples/s\]" | tail -40
cp bench/out/train_throughput_gpu.md "$OUT/" 2>/dev/null
if [ "${SHAPES_S:-300}" != 0 ]; then
    timeout "${SHAPES_S:-300}" python3 bench/shapes.py --steps 12 --timeout 150 --out /tmp/shapes \
        2>&1 | grep -v "Warning\|warn(\|it/s\]\|examples/s\]" | tail -40
    cp /tmp/shapes/shapes.md "$OUT/" 2>/dev/null
fi
# The loss's memory at long answers (8,192 answer tokens, Llama-3.2-1B shape); LOGITS_S=0 leaves it out.
if [ "${LOGITS_S:-120}" != 0 ]; then
    timeout "${LOGITS_S:-120}" python3 bench/logit_memory.py --rows 16 --answer 512 --layers 16 \
        --steps 3 --out /tmp/logit_memory 2>&1 | grep -v "Warning\|warn(" | tail -12
    cp /tmp/logit_memory/logit_memory.md "$OUT/" 2>/dev/null
fi
ls "$OUT"
