"""The Prefect UI and the MLflow UI, rendered by a headless Chromium (Debian's `chromium` package).

Opens the Prefect page of a finished `finetune` flow run and the MLflow page of the model version it
registered (the shared stack of `infra.testing.deployed_stack`), checks the run name and the version
appear in the rendered page, and saves screenshots under FTFLOW_TEST_ARTIFACTS (default
`test-artifacts/ui/` in the checkout).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ftflow.utils import PROJECT_ROOT
from infra import testing

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium chromium-driver"),
]
ARTIFACTS = Path(os.environ.get("FTFLOW_TEST_ARTIFACTS", PROJECT_ROOT / "test-artifacts")) / "ui"


@pytest.fixture(scope="session")
def stack():
    yield testing.deployed_stack()
    testing.stop_shared()


def chromium(url: str, profile: Path, *mode: str, budget_ms: int = 20000) -> str:
    """Run headless Chromium on `url` (no network beyond it, no first-run or update traffic).

    `--virtual-time-budget` lets the single-page apps fetch their data and render before the DOM
    is dumped or the screenshot taken."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-default-apps", "--disable-extensions", "--no-first-run", "--no-default-browser-check",
           "--metrics-recording-only", "--mute-audio", f"--user-data-dir={profile}",
           "--window-size=1440,1000", f"--virtual-time-budget={budget_ms}", *mode, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def render(url: str, name: str, tmp_path: Path) -> str:
    """The rendered DOM of `url`; also saves ARTIFACTS/<name>.png and <name>.html."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    dom = chromium(url, tmp_path / f"profile-{name}", "--dump-dom")
    (ARTIFACTS / f"{name}.html").write_text(dom)
    png = ARTIFACTS / f"{name}.png"
    png.unlink(missing_ok=True)
    chromium(url, tmp_path / f"profile-{name}-shot", f"--screenshot={png}")
    assert png.exists() and png.stat().st_size > 10_000, f"no screenshot of {url}"
    return dom


def test_prefect_ui_shows_the_finished_flow_run(stack, tmp_path):
    run = stack.runs["a"]
    assert run["state"]["type"] == "COMPLETED"
    dom = render(f"{stack.prefect_url}/runs/flow-run/{run['id']}", "prefect-flow-run", tmp_path)
    assert run["name"] in dom, f"flow run name {run['name']!r} not in the rendered page ({ARTIFACTS})"
    assert "Completed" in dom


def test_mlflow_ui_shows_the_registered_version(stack, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(stack.mlflow_url)
    exp = client.get_experiment_by_name("ftflow")
    [parent] = [r for r in client.search_runs([exp.experiment_id], f"tags.`ftflow.prefect_flow_run_id` = '{stack.runs['a']['id']}'")
                if "mlflow.parentRunId" not in r.data.tags]
    [version] = client.search_model_versions(f"name = 'ftflow-stack' and run_id = '{parent.info.run_id}'")
    dom = render(f"{stack.mlflow_url}/#/models/ftflow-stack/versions/{version.version}", "mlflow-model-version", tmp_path)
    assert "ftflow-stack" in dom
    assert f"Version {version.version}" in dom, f"'Version {version.version}' not in the rendered page ({ARTIFACTS})"


def test_chromium_is_debians(tmp_path):
    out = subprocess.run([str(CHROMIUM), "--version"], capture_output=True, text=True, timeout=60).stdout
    assert out.startswith("Chromium"), out
    assert shutil.which("chromedriver") or Path("/usr/bin/chromedriver").exists()
