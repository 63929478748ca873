"""The core package does no I/O: importing it must not pull in sockets, threads or Flask."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ["socket", "threading", "flask", "requests", "xmlrpc.client", "subprocess", "yaml"]


def test_core_imports_nothing_impure() -> None:
    code = (
        "import sys\n"
        "import controlplane.core.states, controlplane.core.policy\n"
        "import controlplane.core.ports, controlplane.core.slug\n"
        "import controlplane.core.placement, controlplane.core.chores, controlplane.core.eviction\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"controlplane.core imported {out.stdout.strip()}"


def test_the_check_itself_can_fail() -> None:
    code = "import sys, socket\nprint('socket' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
