"""How exactly upcycling keeps a pretrained model's function, for several residual specs.

    .venv/bin/python benchmarks/convert_sweep.py                       # SmolLM2, Full + Block S in 1..60
    .venv/bin/python benchmarks/convert_sweep.py --model PATH --specs attnres,block_attnres:block_size=4

Loads the model once, upcycles it to each spec (``resstream.pretrained.upcycle``) and measures,
on the validation split of ``--corpus`` re-tokenized with the model's tokenizer, what
``resstream convert`` reports (relative logit difference, largest logit difference, top-1
agreement, val bits per byte before and after), plus the difference to a PreNorm copy whose
norms use eps * n^2 (n: the sources each zero-query mixture averages), which isolates the norm
epsilon as the cause. A quality measurement: it does not depend on machine load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from resstream.diagnostics.commands import model_agreement, open_with_data, validation_batches  # noqa: E402
from resstream.pretrained import eps_equivalent, upcycle  # noqa: E402
from resstream.residual.config import ResidualConfig, parse_specs  # noqa: E402

DEFAULT = "attnres," + ",".join(f"block_attnres:block_size={s}" for s in (1, 2, 3, 4, 5, 6, 10, 15, 20, 30, 60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--specs", default=DEFAULT)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded, data, corpus = open_with_data(args.model, args.corpus, log=lambda s: None)
    vb = validation_batches(data, loaded.model, args.batches, args.batch_size, args.seq_len)
    print(f"{loaded.name} on {corpus} validation, {sum(x.numel() for x, _ in vb):,} tokens; norm eps {loaded.model.cfg.norm_eps:.3g}")
    print(f"{'spec':34s} {'rel logit diff':>14s} {'max |diff|':>10s} {'top-1 agree':>11s} {'bpb before':>10s} "
          f"{'bpb after':>10s} {'delta bpb':>10s} {'vs eps*n^2':>10s}")
    for label, res in parse_specs(args.specs.split(",")):
        converted = upcycle(loaded.model, ResidualConfig.from_dict(res))
        a = model_agreement(loaded.model, converted, vb, data.token_bytes)
        eps_rel = model_agreement(eps_equivalent(loaded.model, converted), converted, vb, data.token_bytes)["rel_logit_diff"]
        print(f"{label:34s} {a['rel_logit_diff']:14.3e} {a['max_abs_logit_diff']:10.3g} {a['top1_agreement']:11.2%} "
              f"{a['bpb_before']:10.5f} {a['bpb_after']:10.5f} {a['delta_bpb']:+10.2e} {eps_rel:10.2e}", flush=True)


if __name__ == "__main__":
    main()
