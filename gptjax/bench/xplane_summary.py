"""Device time of a profiler trace by XLA op: where a train step's time goes.

    python -m gptjax.bench.xplane_summary TRACE.xplane.pb[.gz] [STEP.hlo.txt[.gz]] \
        [--top N] [--steps S]

TRACE is what `python -m gptjax.bench train --profile DIR` writes (DIR/plugins/profile/*/
*.xplane.pb; gptjax/bench/gpu_profile.sh brings it back gzipped). With the step's HLO text,
each op is also classed (matmul, attention, fusion kind, copy, ...). Reads the trace with
TensorFlow's xplane_pb2 (TensorFlow is a dependency here, not on the GPU machine: run this one
locally).
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
    """instruction name -> class (matmul, attention, copy, fusion:<kind>, or the opcode), from
    the step's HLO text. A GPU fusion's kernel carries the fusion's name, so this classes kernels
    too."""
    with_dot, current = set(), None
    for ln in hlo.splitlines():  # computations that hold a matrix product
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", ln)
        if head:
            current = head.group(1)
        elif current and re.search(r"\s(dot|convolution)\(", ln):
            with_dot.add(current)
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", hlo, re.M):
        name, rest = m.groups()
        op = re.search(r"\s([a-z][\w\-]*)\(", rest)
        op = op.group(1) if op else "?"
        if op == "custom-call":
            t = re.search(r'custom_call_target="([^"]+)"', rest)
            op = _kernel_class(t.group(1) if t else "?") or "custom-call"
        elif op == "fusion":
            kind = re.search(r'"kind":"(__\w+)"', rest) or re.search(r"kind=(k\w+)", rest)
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            op = "matmul" if (kind and "gemm" in kind.group(1)) or (
                called and called.group(1) in with_dot) else \
                f"fusion:{kind.group(1) if kind else '?'}"
        elif op in ("dot", "convolution"):
            op = "matmul"
        out[name] = out[name.replace(".", "_")] = op  # kernels write fusion.3 as fusion_3
    return out


def _kernel_class(name: str) -> str | None:
    """A class from a GPU kernel's or custom call's own name, where it says."""
    low = name.lower()
    if any(k in low for k in ("fmha", "sdpa", "flash", "cudnn")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cublas", "xmma", "cutlass", "matmul")):
        return "matmul"
    if "memcpy" in low or "memset" in low:
        return "copy"
    return None


def summarize(trace: bytes, classes: dict[str, str], top: int, steps: int) -> str:
    """Device time by class and by op. On a GPU trace, the kernels of the device's streams (by
    kernel name: XLA's command buffers would otherwise hide every op in one); on a CPU trace,
    XLA's ops on the host's threads (by HLO name; threads overlap, so the sum can exceed the
    span)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    space.ParseFromString(trace)
    gpu = any(p.name.startswith("/device:GPU") for p in space.planes)
    by_op: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    start, end = [], []
    for plane in space.planes:
        if not plane.name.startswith("/device:GPU" if gpu else "/host:CPU"):
            continue
        stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
        for line in plane.lines:
            if not (("Stream" in line.name) if gpu else line.name.startswith("tf_XLA")):
                continue
            for ev in line.events:
                hlo_op = None
                for st in ev.stats:
                    if stat_names.get(st.metadata_id) == "hlo_op":
                        hlo_op = st.str_value or plane.stat_metadata[st.ref_value].name
                if hlo_op is None and not gpu:
                    continue  # the thread pool's own bookkeeping
                key = plane.event_metadata[ev.metadata_id].name if gpu else hlo_op
                by_op[key] += ev.duration_ps
                calls[key] += 1
                t0 = line.timestamp_ns * 1000 + ev.offset_ps
                start.append(t0)
                end.append(t0 + ev.duration_ps)
    if not by_op:
        return "no XLA op events in this trace"
    busy = sum(by_op.values())
    ms = 1e-9 / steps

    def cls(op: str) -> str:
        return classes.get(op) or _kernel_class(op) or "?"

    lines = [f"{'GPU kernel' if gpu else 'CPU op'} time {busy * ms:.2f} ms per step, over a span "
             f"of {(max(end) - min(start)) * ms:.2f} ms per step ({steps} steps)"]
    by_class: collections.Counter[str] = collections.Counter()
    for op, ps in by_op.items():
        by_class[cls(op)] += ps
    lines.append("by class:")
    lines += [f"  {c:32} {ps * ms:9.3f} ms  {ps / busy:6.1%}" for c, ps in by_class.most_common()]
    lines.append(f"top {top} ops:")
    lines += [f"  {op[:70]:70} {cls(op)[:24]:24} {ps * ms:9.3f} ms  x{calls[op] / steps:g}"
              for op, ps in by_op.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gptjax.bench.xplane_summary",
                                description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("hlo", nargs="?")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--steps", type=int, default=3, help="steps the trace holds (--profile: 3)")
    a = p.parse_args(argv)
    classes = op_classes(_open(a.hlo).decode()) if a.hlo else {}
    print(summarize(_open(a.trace), classes, a.top, a.steps))


if __name__ == "__main__":
    main()
