"""Run slim's shipped lm-eval tasks (slim/assets/tasks) offline on an in-memory model.

The task YAMLs name their data files relative to slim/assets/; here they are copied to a temporary
directory with those paths made absolute (what slim's evaluation code does at run time).

    python experiments/tiny_model/eval_tasks.py      # on the exported slim/assets/tiny_deepseek
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import common
import yaml

TASKS = ("slim_text_ppl", "slim_text_mc")
TASK_DIR = common.ASSETS / "tasks"


def absolutize_tasks(dst: Path) -> None:
    for src in TASK_DIR.glob("*.yaml"):
        cfg = yaml.safe_load(src.read_text())
        files = cfg.get("dataset_kwargs", {}).get("data_files", {})
        for split, rel in files.items():
            files[split] = str((common.ASSETS / rel).resolve())
        (dst / src.name).write_text(yaml.safe_dump(cfg, sort_keys=False))


def run(model, tokenizer, batch_size: int = 16) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        absolutize_tasks(Path(tmp))
        t0 = time.time()
        res = simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
            tasks=list(TASKS),
            task_manager=TaskManager(include_path=tmp),
            log_samples=False,
        )
        wall = time.time() - t0
    out = {"seconds": round(wall, 1)}
    for task in TASKS:
        r = res["results"][task]
        out[task] = {k.split(",")[0]: round(v, 4) for k, v in r.items()
                     if isinstance(v, float) and not k.startswith(("alias",)) and "stderr" not in k}
        out[task].update({k.split(",")[0]: round(v, 4) for k, v in r.items() if "stderr" in k and isinstance(v, float)})
    return out


if __name__ == "__main__":
    import export

    model, _ = export.load_exported_model()
    from transformers import AutoTokenizer

    print(json.dumps(run(model, AutoTokenizer.from_pretrained(str(common.MODEL_DIR))), indent=1))
