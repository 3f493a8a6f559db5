"""The run folder: its config, status, metrics and checkpoints, and loading a trained run.

    config.py      RunConfig (everything one run needs), presets, load_run_config
    folder.py      config.json, status.json, metrics.jsonl (atomic writes)
    checkpoint.py  checkpoints: safetensors + hashes, newest good one
    load.py        load_run_model, load_run, run_data, load_model (a run or any model path), generate_from_run
"""
from resstream.runs.checkpoint import CheckpointError
from resstream.runs.config import RunConfig, load_run_config, preset_path
from resstream.runs.load import generate_from_run, load_model, load_run, load_run_model, run_data

__all__ = ["CheckpointError", "RunConfig", "generate_from_run", "load_model", "load_run", "load_run_config", "load_run_model",
           "preset_path", "run_data"]
