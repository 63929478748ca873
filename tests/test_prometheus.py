"""A real Prometheus (Debian's package) scrapes the control plane and a worker."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.stack import ROOT, free_port_block, wait_until


def query(base: str, q: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?query={urllib.parse.quote(q)}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        data = json.load(resp)
    return data["data"]["result"]  # type: ignore[no-any-return]


def test_prometheus_scrapes_control_plane_and_workers(live_metrics: dict[str, str]) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "Debian's prometheus package is needed (bin/install_system_deps)"
    cp = live_metrics["controlplane_url"].removeprefix("http://")
    port = free_port_block(1)
    work = Path(tempfile.mkdtemp(prefix="mp-prom-"))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
        "scrape_configs": [
            {"job_name": "modelpool", "static_configs": [{"targets": [cp]}]},
            {
                "job_name": "modelpool-workers",
                "honor_labels": True,
                "http_sd_configs": [{"url": f"http://{cp}/sd/workers", "refresh_interval": "1s"}],
            },
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def both_up() -> bool:
            try:
                ups = {r["metric"]["job"]: r["value"][1] for r in query(base, "up")}
            except OSError:
                return False
            return ups.get("modelpool") == "1" and ups.get("modelpool-workers") == "1"

        wait_until(both_up, timeout=30, interval=0.5)
        worker = query(base, "up{job='modelpool-workers'}")[0]["metric"]
        assert worker["model"] == "tiny:1b"
        assert worker["instance"].endswith(":" + live_metrics["worker_port"])
        hot = wait_until(lambda: query(base, "modelpool_models{state='HOT'}"), timeout=10)
        assert hot[0]["value"][1] == "1"
        with urllib.request.urlopen(base + "/api/v1/rules", timeout=5) as resp:
            groups = json.load(resp)["data"]["groups"]
        assert any(g["name"] == "modelpool" and g["rules"] for g in groups)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(work, ignore_errors=True)
