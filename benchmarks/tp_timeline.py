"""Draw one decoding step from chrome traces written by ``tp_decode.py --trace DIR``: the main
thread's matmuls and its waits on all-reduces, and the all-reduces themselves on gloo's
worker threads, one panel per trace, on a common time axis.

    python benchmarks/tp_timeline.py DIR/tp_decode_prenorm_b1_rank0.json DIR/tp_decode_ladder_b1_rank0.json \\
        --out docs/tp/decode_timeline.png

A decoding step runs from one ``aten::embedding`` on the main thread to the next; ``--step``
picks which (default: the middle one of the trace).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm"}


def load_step(path: Path, step: int | None) -> dict[str, list[tuple[float, float]]]:
    """Intervals (ms from the step's start) of matmuls, waits and all-reduces in one step."""
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
    waits = [e for e in events if e["name"].endswith("wait_tensor")]
    main = waits[0]["tid"] if waits else max({e["tid"] for e in events}, key=lambda t: sum(e["tid"] == t for e in events))
    starts = sorted(e["ts"] for e in events if e["name"] == "aten::embedding" and e["tid"] == main)
    k = len(starts) // 2 if step is None else step
    t0, t1 = starts[k], starts[k + 1]

    def spans(test) -> list[tuple[float, float]]:
        return [((e["ts"] - t0) / 1e3, (e["ts"] + e["dur"] - t0) / 1e3) for e in events
                if test(e) and t0 <= e["ts"] < t1]

    return {"matmul (main thread)": spans(lambda e: e["name"] in MATMUL and e["tid"] == main),
            "waiting on all-reduce (main thread)": spans(lambda e: e["name"].endswith("wait_tensor") and e["tid"] == main),
            "all-reduce (gloo thread)": spans(lambda e: e["name"] == "gloo:all_reduce"),
            "_length": [(0.0, (t1 - t0) / 1e3)]}


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--step", type=int, default=None)
    args = ap.parse_args(argv)
    steps = [load_step(p, args.step) for p in args.traces]
    length = max(s["_length"][0][1] for s in steps)
    colors = {"matmul (main thread)": "tab:green", "waiting on all-reduce (main thread)": "tab:red",
              "all-reduce (gloo thread)": "tab:blue"}
    fig, axes = plt.subplots(len(steps), 1, figsize=(11, 1.4 + 1.1 * len(steps)), sharex=True, squeeze=False)
    for ax, path, step in zip(axes[:, 0], args.traces, steps):
        for row, (label, color) in enumerate(colors.items()):
            ax.broken_barh([(a, b - a) for a, b in step[label]], (row - 0.4, 0.8), facecolors=color, label=label)
        ax.set_yticks(range(len(colors)), ["matmuls", "waiting", "all-reduce"])
        ax.set_ylim(-0.6, len(colors) - 0.4)
        ax.set_title(f"{path.stem}: one decoding step, {step['_length'][0][1]:.1f} ms", fontsize=9, loc="left")
    axes[-1, 0].set_xlim(0, length)
    axes[-1, 0].set_xlabel("ms since the step's embedding lookup")
    axes[0, 0].legend(loc="upper right", fontsize=7, ncol=3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
