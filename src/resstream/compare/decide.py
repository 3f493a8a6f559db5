"""Statistics that can decide: ``--seeds auto`` (add seeds until the paired test decides or a cap
is reached) and the report's power statement (how many seeds a difference would need).

``--seeds auto`` starts with the configured seeds (at least 2), trains every kind on them, and
then adds one seed at a time (every kind, the same seed) while some kind's paired p-value
against the baseline is at or above the per-look threshold and fewer than ``cap`` seeds are in.
The threshold is not 0.05: looking after every seed and stopping at the first small p would
declare differences that are not there more often than 5% of the time, so each look uses the
smaller threshold at which the chance of any false stop over all looks is 5%
(``power.sequential_threshold``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from resstream.compare.collect import run_record
from resstream.compare.power import sequential_threshold
from resstream.compare.stats import summarize
from resstream.diagnostics.document import Block

ALPHA = 0.05


def _quick_stats(out: Path, kinds, seeds, baseline: str) -> dict:
    """Per kind the compare statistics from the run folders alone (no depth measurements)."""
    s = {"setup": {"baseline": baseline},
         "kinds": {label: {"runs": [run_record(out / "runs" / f"{label}-s{sd}", sd) for sd in seeds]} for label, _ in kinds}}
    return {label: k["stats"] for label, k in summarize(s)["kinds"].items()}


def run_until_decided(out: Path, kinds, first_seeds: list[int], cap: int, baseline: str,
                      train_seeds: Callable[[list[int]], None], log=print) -> tuple[list[int], dict]:
    """Train seeds (``train_seeds(seeds)`` trains every kind on them, skipping finished runs)
    until every kind's paired p is below the threshold or ``cap`` seeds are in. Returns the
    seeds and the record of the procedure (for summary.json and the report)."""
    seeds = list(first_seeds)
    while len(seeds) < 2:
        seeds.append(seeds[-1] + 1)
    cap = max(cap, len(seeds))
    threshold = sequential_threshold(len(seeds), cap, ALPHA)
    looks = []
    while True:
        train_seeds(seeds)
        stats = _quick_stats(out, kinds, seeds, baseline)
        ps = {label: st["p_paired"] for label, st in stats.items() if label != baseline}
        undecided = [label for label, p in ps.items() if p is None or p >= threshold]
        looks.append({"seeds": len(seeds), "p_paired": ps})
        log(f"--seeds auto: {len(seeds)} seeds; paired p " + ", ".join(
            f"{label} {'n/a' if p is None else f'{p:.3g}'}" for label, p in ps.items()) + f" (threshold {threshold:.3g})")
        if not undecided or len(seeds) >= cap:
            break
        seeds.append(seeds[-1] + 1)
    record = {"first": len(first_seeds), "cap": cap, "alpha": ALPHA, "threshold": threshold, "looks": looks,
              "stopped": "decided" if not undecided else "cap", "undecided": undecided}
    return seeds, record


# ----------------------------------------------------------------------------- report text


def seeds_cell(stats: dict) -> str:
    """The 'seeds for 80% power' table cell of a kind's stats."""
    if stats.get("seeds_needed"):
        return str(stats["seeds_needed"])
    note = stats.get("seeds_needed_note") or ""
    return f">{note.split()[2]}" if note.startswith("more than") else "–"


def _power_line(label: str, st: dict) -> str | None:
    n = st.get("n_pairs") or 0
    if st.get("paired_mean_diff") is None or n < 2:
        return None
    head = f"{label}: mean per-seed difference {st['paired_mean_diff']:+.4f} over {n} seeds"
    if st.get("seeds_needed"):
        need = st["seeds_needed"]
        tail = (f"; if that difference and its seed-to-seed spread are the truth, {need} seeds give p < 0.05 "
                f"in 80% of repeated experiments" + (" (fewer than run here)" if need < n else ""))
    else:
        tail = f"; no seed count: {st.get('seeds_needed_note')}"
    return head + tail + "."


def decision_blocks(summary: dict) -> list[Block]:
    """The power statement of every kind, and how ``--seeds auto`` ended, as report blocks."""
    from resstream.compare.stats import baseline_label

    base = baseline_label(summary)
    lines = [line for label, k in summary["kinds"].items() if label != base
             if (line := _power_line(label, k["stats"])) is not None]
    blocks = []
    if lines:
        blocks += [Block("h2", "How many seeds would decide"), Block("ul", items=lines), Block("p",
                   "The spread of a few seeds is itself uncertain, so these counts give the order of magnitude; a "
                   "difference near zero needs very many seeds, and a count below the seeds run means the observed "
                   "difference is large for its spread.")]
    auto = summary.get("setup", {}).get("seeds_auto")
    if auto:
        how = ("every kind's paired p fell below the threshold" if auto["stopped"] == "decided"
               else f"the cap of {auto['cap']} seeds was reached with {', '.join(auto['undecided'])} undecided")
        blocks.append(Block("p", f"Seeds chosen by --seeds auto: started with {auto['first']}, added one at a time up to "
                                 f"{auto['cap']}, and stopped because {how}. Each look used the threshold p < "
                                 f"{auto['threshold']:.3g} instead of 0.05, so that looking after every seed keeps the "
                                 f"chance of declaring a difference that is not there at {auto['alpha']:.0%} overall."))
    return blocks
