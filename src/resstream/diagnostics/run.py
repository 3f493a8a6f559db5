"""``resstream diagnose RUN_DIR|MODEL``: the depth profile of one model, measured and drawn.

A run folder: its newest good checkpoint, measured on the first validation windows (the same
windows evaluation uses), written into RUN_DIR/diagnostics (or ``out_dir``). Any other model
path (GGUF, Hugging Face or resstream model folder): measured on the validation split of
``corpus`` re-tokenized with its tokenizer, written to diagnostics-NAME (or ``out_dir``).
"""
from __future__ import annotations

import json
from pathlib import Path

from resstream.diagnostics.depth import measure_depth


def diagnose_run(run_dir: Path | str, out_dir: Path | str | None = None, batches: int = 4, device: str = "cpu",
                 corpus: str | None = None) -> dict:
    """Measure and plot how the run's model uses its depth.

    Returns {"run_dir", "out_dir", "label", "depth" (the ``measure_depth`` result),
    "files" (paths written: depth.json, depth_rms.png, grad_norm.png, and mixing.png for kinds
    that mix over depth)}.
    """
    from resstream.config import ConfigError
    from resstream.diagnostics import plots
    from resstream.diagnostics.commands import open_with_data
    from resstream.data.batches import val_batches

    if batches < 1:
        raise ConfigError(f"--batches: must be >= 1 (validation batches to measure on), got {batches}")
    loaded, data, _ = open_with_data(run_dir, corpus, device=device)
    model, run_cfg, run_dir = loaded.model, loaded.run_config, loaded.path
    default = run_dir / "diagnostics" if loaded.source == "run" else Path(f"diagnostics-{loaded.name}")
    out_dir = Path(out_dir) if out_dir is not None else default
    if run_cfg is not None:
        tc = run_cfg.train
        seq_len = min(tc.seq_len, model.cfg.max_seq_len)
        micro = max(1, tc.batch_size // tc.grad_accum)  # the batch one forward pass saw in training
    else:
        seq_len, micro = min(256, model.cfg.max_seq_len), 1
    depth = measure_depth(model, val_batches(data.val, batches, micro, seq_len))

    kind = model.cfg.residual.kind
    label = f"{loaded.name} ({kind})" if loaded.name != kind else kind
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"run_dir": str(run_dir), "label": label, "residual": model.cfg.residual.to_dict(),
              "batches": depth["n_batches"], "batch_size": micro, "seq_len": seq_len, "depth": depth}
    files = [out_dir / "depth.json"]
    files[0].write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    files.append(plots.plot_depth_rms({label: depth["output_rms"]}, out_dir / "depth_rms.png",
                                      input_rms={label: depth["input_rms"]},
                                      title=f"Magnitude by depth: {label}"))
    files.append(plots.plot_grad_norms({label: depth["grad_norm"]}, out_dir / "grad_norm.png",
                                       grad_norm_output={label: depth["grad_norm_output"]},
                                       title=f"Gradient magnitude by depth: {label}"))
    if depth["mixing"] is not None:
        files.append(plots.plot_mixing_heatmap(depth["mixing"], depth["source_names"], out_dir / "mixing.png",
                                               title=f"Depth-mixing weights: {label}", sums_to_one=depth["mixing_sums_to_one"],
                                               legend=model.residual.source_legend))
    return {"run_dir": str(run_dir), "out_dir": str(out_dir), "label": label, "depth": depth,
            "files": [str(f) for f in files]}


def format_depth(depth: dict) -> str:
    """A per-sublayer plain-text table of a ``measure_depth`` result, for the terminal."""
    cols = [("out RMS", "output_rms"), ("in RMS", "input_rms"), ("|y|/|x|", "rel_contribution"),
            ("cos(y,x)", "cos_in_out"), ("|dL/dθ|", "grad_norm"), ("|dL/dy|", "grad_norm_output")]
    head = f"{'sublayer':<12}" + "".join(f"{c:>11}" for c, _ in cols)
    lines = [head, "-" * len(head)]
    for l in range(len(depth["output_rms"])):
        name = f"{l} {'attn' if l % 2 == 0 else 'mlp'} {l // 2}"
        lines.append(f"{name:<12}" + "".join(f"{depth[k][l]:>11.4g}" for _, k in cols))
    lines.append(f"final input RMS {depth['final_input_rms']:.4g}; loss {depth['loss']:.4f} nats/token "
                 f"over {depth['n_tokens']:,} tokens")
    return "\n".join(lines)
