"""A prompt -> completion task from the Python standard library, for docs/finetune-eval.md's
LoRA example: the prompt is a function's `def` line, the completion the line that follows it
(most often its docstring's first line). Deterministic: 6,705 records from CPython 3.11.

    python examples/lora/make_task.py runs/task/task.jsonl
"""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path


def records(root: Path) -> list[dict[str, str]]:
    out = []
    for path in sorted(root.glob("*.py")):
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines[:-1]):
            head, nxt = line.strip(), lines[i + 1]
            if head.startswith("def ") and head.endswith(":") and nxt.strip():
                out.append({"prompt": line.lstrip() + "\n", "completion": nxt.strip() + "\n"})
    return out


def main() -> None:
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    recs = records(Path(sysconfig.get_paths()["stdlib"]))
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    print(f"{len(recs)} records -> {out}")


if __name__ == "__main__":
    main()
