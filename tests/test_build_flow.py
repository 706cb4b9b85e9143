"""`radsynth build` runs a real Prefect flow on an ephemeral local API (one per test session)."""

import asyncio
import json
import os
import subprocess
import sys

import pytest

from radsynth.flows.cli import main


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_build_runs_the_ingest_task_in_a_prefect_flow_and_reports_json(prefect_server, msd_config, tmp_path, capsys):
    config = msd_config()
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    assert main(["build", str(path), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["command"] == "build" and report["stages"] == ["ingest"]
    assert report["dataset_cases"] == 6 and report["preprocessed_now"] == 6
    assert (tmp_path / "run" / "data" / "manifest.jsonl").is_file()

    from prefect import get_client

    async def build_runs():
        async with get_client() as client:
            flows = {flow.id: flow.name for flow in await client.read_flows()}
            return [(flows[run.flow_id], run.state.type.value) for run in await client.read_flow_runs()]

    assert asyncio.run(build_runs()) == [("build", "COMPLETED")]


def test_build_in_a_fresh_run_folder_starts_its_own_ephemeral_server(msd_config, tmp_path):
    """The quick-start path: no harness, no server, a run folder that does not exist yet."""
    config = msd_config(f"runtime.output_dir={tmp_path / 'fresh' / 'run'}")
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([sys.executable, "-m", "radsynth.flows.cli", "build", str(path), "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["dataset_cases"] == 6
    assert (tmp_path / "fresh" / "run" / ".prefect" / "prefect.db").is_file()  # Prefect's SQLite lives in the run
