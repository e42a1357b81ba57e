"""Device time of a profiler trace by XLA op: where a train step's time goes.

    python bench/xplane_summary.py TRACE.xplane.pb[.gz] [STEP.hlo.txt[.gz]] [--top N] [--steps S]

TRACE is what `python -m gptjax.bench train --profile DIR` writes (DIR/plugins/profile/*/
*.xplane.pb; bench/gpu_profile.sh brings it back gzipped). With the step's HLO text, each op is
also classed (matmul, attention, fusion kind, copy, ...). Reads the trace with TensorFlow's
xplane_pb2 (TensorFlow is a dependency here, not on the GPU machine: run this one locally).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re


def _open(path: str) -> bytes:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        return f.read()


def op_classes(hlo: str) -> dict[str, str]:
    """instruction name -> class, from HLO text."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", hlo, re.M):
        name, rest = m.groups()
        op = re.search(r"\s([a-z][\w\-]*)\(", rest)
        op = op.group(1) if op else "?"
        if op == "custom-call":
            t = re.search(r'custom_call_target="([^"]+)"', rest)
            t = t.group(1) if t else "?"
            op = ("attention" if "fmha" in t or "cudnn" in t.lower() else
                  "matmul" if "gemm" in t or "matmul" in t.lower() else f"custom:{t}")
        elif op == "fusion":
            k = re.search(r"kind=(k\w+)", rest)
            cfg = re.search(r'"kind":"(__\w+)"', rest)
            op = f"fusion:{cfg.group(1) if cfg else (k.group(1) if k else '?')}"
        out[name] = op
    return out


def summarize(trace: bytes, classes: dict[str, str], top: int, steps: int) -> str:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    space.ParseFromString(trace)
    by_op: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    busy = 0
    span = [None, None]
    for plane in space.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
        for line in plane.lines:
            if "Compute" not in line.name and "Stream" not in line.name:
                continue
            for ev in line.events:
                op = None
                for st in ev.stats:
                    if stat_names.get(st.metadata_id) == "hlo_op":
                        op = (st.str_value or plane.stat_metadata[st.ref_value].name)
                if op is None:
                    op = plane.event_metadata[ev.metadata_id].name[:60]
                by_op[op] += ev.duration_ps
                calls[op] += 1
                busy += ev.duration_ps
                t0 = line.timestamp_ns * 1000 + ev.offset_ps
                span[0] = t0 if span[0] is None else min(span[0], t0)
                span[1] = t0 + ev.duration_ps if span[1] is None else max(span[1], t0 + ev.duration_ps)
    if not by_op:
        return "no GPU kernel events in this trace"
    ms = 1e-9 / steps
    lines = [f"GPU kernel time {busy * ms:.1f} ms per step over a span of "
             f"{(span[1] - span[0]) * ms:.1f} ms per step ({steps} steps)"]
    by_class: collections.Counter[str] = collections.Counter()
    for op, ps in by_op.items():
        by_class[classes.get(op, "?")] += ps
    lines.append("by class:")
    lines += [f"  {c:40} {ps * ms:8.2f} ms  {ps / busy:6.1%}" for c, ps in by_class.most_common()]
    lines.append(f"top {top} ops:")
    lines += [f"  {op[:60]:60} {classes.get(op, '?')[:28]:28} {ps * ms:8.2f} ms  x{calls[op] / steps:g}"
              for op, ps in by_op.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("hlo", nargs="?")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--steps", type=int, default=3, help="steps the trace holds (--profile: 3)")
    a = p.parse_args()
    classes = op_classes(_open(a.hlo).decode()) if a.hlo else {}
    print(summarize(_open(a.trace), classes, a.top, a.steps))


if __name__ == "__main__":
    main()
