"""Saves an fp16 copy of all-MiniLM-L6-v2 (weights, config, tokenizer) small enough to carry to the GPU.

Usage: python benchmarks/export_minilm.py .minilm   (then carry .minilm and set TRITONIZE_MINILM_PATH=.minilm)
"""

import shutil
import sys
from pathlib import Path

import transformers

from tritonize.bench.models import minilm_path

target = Path(sys.argv[1] if len(sys.argv) > 1 else ".minilm")
source = Path(minilm_path())
model = transformers.AutoModel.from_pretrained(source).half()
model.save_pretrained(target)
transformers.AutoTokenizer.from_pretrained(source).save_pretrained(target)
for extra in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling"):
    src = source / extra
    if src.is_dir():
        shutil.copytree(src, target / extra, dirs_exist_ok=True)
    elif src.exists():
        shutil.copy(src, target / extra)
print(f"saved {sum(f.stat().st_size for f in target.rglob('*') if f.is_file()) / 2**20:.1f} MiB to {target}")
