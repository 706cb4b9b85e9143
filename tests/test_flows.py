"""The Prefect flows on a tiny real build: end to end with artifacts, resume after a kill during generate,
a config change that redoes only what changed, sampling shards on a Dask LocalCluster, retries, failed states,
the accelerate launch of training, prefect.yaml, and a scheduled build on a real Prefect server on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image as PILImage

from radsynth.configs import UserInputError
from radsynth.flows.cli import USER_ERROR_EXIT

from .test_scoring_evaluate import RELEASABLE
from .test_training_stage import tiny_config

REPO = Path(__file__).resolve().parents[1]
# The tiny model draws noise, which quality gates rightly refuse (they are tested on scorecards elsewhere);
# privacy gates cannot be switched off and stay on.
TINY_BUILD = ["diffusion.max_steps=4", *RELEASABLE, "scoring.utility=false",
              "release.formats=[monai,imagefolder,png16]", "release.gate.coverage_margin=null",
              "release.gate.intensity=false", "release.gate.mask_dice_ratio_min=null",
              "release.gate.attribute_adherence_min=null",
              "conditioning.class_attribute=finding", "sampling.num_samples=12", "sampling.shard_size=4"]


def build_config(tmp_path: Path, name: str, *extra: str) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    config = tiny_config(run_dir, *TINY_BUILD, *extra)
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json", by_alias=True)))
    return path, run_dir


def clean_env(**extra: str) -> dict[str, str]:
    """No PREFECT_* from the test session: a subprocess starts its own ephemeral API in its run folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


def radsynth(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "radsynth.flows.cli", *args], env=env or clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def last_json(done: subprocess.CompletedProcess) -> dict:
    assert done.stdout.strip(), done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def prefect_db(run_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(run_dir / ".prefect" / "prefect.db")


# ------------------------------------------------------------------------------- build, kill, resume


@pytest.mark.slow
def test_a_build_killed_during_generate_resumes_and_a_config_change_redoes_only_what_changed(tmp_path):
    # Slow sampling (many steps), so that the kill lands while shards are being written.
    path, run_dir = build_config(tmp_path, "build", "sampling.num_inference_steps=150")
    samples = run_dir / "samples"
    process = subprocess.Popen([sys.executable, "-m", "radsynth.flows.cli", "build", str(path), "--json"],
                               env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # its own group: the kill takes Prefect's server with it
    storage = run_dir / ".prefect" / "storage"  # Prefect's result records: a shard's appears once it finished
    deadline = time.time() + 400
    while not list(storage.glob("generate-*")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    written_before_kill = len(list(samples.glob("*.json")))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 4 <= written_before_kill < 12, "the kill should land during generate"
    assert (run_dir / "model" / "model_index.json").is_file() and not (run_dir / "eval").exists()

    done = radsynth("build", str(path), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = last_json(done)
    tasks = resumed["tasks"]
    assert tasks["train"] == "Cached" and tasks["ingest"] == "Completed"  # ingest is its own cache: always runs
    assert tasks["generate-shard-0"] == "Cached"  # finished before the kill
    assert tasks["generate-shard-2"] == "Completed"  # not finished before the kill
    assert tasks["evaluate"] == "Completed" and tasks["release"] == "Completed"
    assert resumed["gate_passed"] and resumed["release"]["version"] == "v1"
    assert len(list(samples.glob("*.json"))) == 12

    # Artifacts: the scorecard table, the gate's markdown, the report link, progress of training and sampling.
    with prefect_db(run_dir) as db:
        artifacts = {key: (kind, data) for key, kind, data in db.execute("select key, type, data from artifact")}
    name = "demo-cxr-phantom"
    assert artifacts[f"{name}-scorecard"][0] == "table" and "frechet_distance" in artifacts[f"{name}-scorecard"][1]
    assert artifacts[f"{name}-gate"][0] == "markdown" and "PASSED" in artifacts[f"{name}-gate"][1]
    assert "report.html" in artifacts[f"{name}-report"][1]  # Prefect stores a link as markdown
    assert artifacts[f"{name}-sampling"][0] == artifacts[f"{name}-training"][0] == "progress"

    # Twice as many samples: train and the finished shards come from the cache; only the new shards, the
    # scorecard (new samples) and the release (a new version) run.
    changed = path.with_name("more.yaml")
    changed.write_text(json.dumps({**json.loads(path.read_text()), "sampling": {
        **json.loads(path.read_text())["sampling"], "num_samples": 20}}))
    again = last_json(radsynth("build", str(changed), "--json"))
    ran = {name for name, state in again["tasks"].items() if state != "Cached"}
    assert ran == {"ingest", "generate-shard-3", "generate-shard-4", "evaluate", "release"}, again["tasks"]
    assert again["release"]["version"] == "v2" and again["release"]["n_scored"] == 20

    # The same build once more, its shards on a Dask LocalCluster this time: where samples are drawn is not
    # part of a shard's key, so nothing but the two self-caching stages runs, and the release is a no-op.
    # The workers report to the build's ephemeral API rather than each starting one on the same SQLite file.
    done = radsynth("build", str(changed), "runtime.task_runner=dask", "runtime.workers=2", "--json")
    same = last_json(done)
    assert done.stderr.count("Starting temporary server") == 1, done.stderr[-3000:]
    assert {name for name, state in same["tasks"].items() if state != "Cached"} == {"ingest", "release"}
    assert same["release"]["reused"] and same["release"]["version"] == "v2"
    assert {"headline", "scorecard", "model_dir", "sample_dir"} <= set(same)


# ------------------------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_server):
    from radsynth.flows.stages import train_flow

    tmp_path = tmp_path_factory.mktemp("flows")
    path, run_dir = build_config(tmp_path, "run")
    return path, run_dir, train_flow(str(path))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def dask_cluster():
    """An existing Dask cluster on loopback: a scheduler and two single-thread worker processes, started without
    any Prefect settings (the shards must bring the run's API address with them)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    cli = [sys.executable, "-m"]
    processes = [subprocess.Popen([*cli, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                                   address.rsplit(":", 1)[1], "--no-dashboard"], env=clean_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    processes += [subprocess.Popen([*cli, "distributed.cli.dask_worker", address, "--nthreads", "1", "--name",
                                    f"w{i}", "--no-dashboard"], env=clean_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL) for i in range(2)]
    from distributed import Client

    with Client(address, timeout=120) as client:
        client.wait_for_workers(2, timeout=120)
    yield address
    for process in processes[::-1]:
        process.terminate()
        process.wait(timeout=60)


def sample_on(runner: str, trained, out: Path, *extra: str) -> tuple[dict, list[str]]:
    """The model's 12 samples in three shards on ``runner``, drawn by the generate flow in a process of its own on
    its ephemeral API (as a build runs); every shard must report its run there (not to a server of its own)."""
    path, run_dir, result = trained
    overrides = [f"runtime.task_runner={runner}", "runtime.workers=2", f"scoring.sample_dir={out}", *extra]
    home = out.parent / f"{out.name}-run"
    script = ("import json, sys; from radsynth.flows.settings import configure_prefect; configure_prefect(sys.argv[1]); "
              "from radsynth.flows.stages import generate_flow; print(json.dumps(generate_flow(sys.argv[2], "
              "sys.argv[5:], model_dir=sys.argv[3], model_hash=sys.argv[4])))")
    done = subprocess.run([sys.executable, "-c", script, str(home), str(path), result["model_dir"],
                           result["model_hash"], *overrides], env=clean_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("Starting temporary server") == 1, done.stderr[-3000:]
    generated = last_json(done)
    assert generated["tasks"] == {f"generate-shard-{i}": "Completed" for i in range(3)}
    with prefect_db(home) as db:
        reported = db.execute("select count(*) from task_run where name like 'generate-shard-%' "
                              "and state_type = 'COMPLETED'").fetchone()[0]
    assert reported == 3
    images = {p.name: np.asarray(PILImage.open(p)).astype(np.int64) for p in sorted(out.glob("*.png"))}
    return images, generated["processes"]


@pytest.fixture(scope="module")
def threads_images(trained, tmp_path_factory):
    images, processes = sample_on("threads", trained, tmp_path_factory.mktemp("threads") / "samples")
    assert len(processes) == 1 and len(images) == 12
    return images, processes[0]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["dask local cluster", "dask existing cluster", "ray local"])
def test_shards_on_other_processes_report_here_and_draw_the_same_images_as_threads(where, trained, threads_images,
                                                                                    tmp_path, request):
    runner = where.split()[0]
    extra = [f"runtime.cluster_address={request.getfixturevalue('dask_cluster')}"] if "existing" in where else []
    images, processes = sample_on(runner, trained, tmp_path / "samples", *extra)
    expected, flow_process = threads_images
    assert processes and flow_process not in processes, "worker processes sampled"
    assert images.keys() == expected.keys()
    # A sample depends on its index and seed, not on where it ran. Workers run torch on one thread, which
    # reorders float sums: allow a few 16-bit levels, far below any visible change.
    for name, pixels in images.items():
        assert np.abs(pixels - expected[name]).max() <= 64, name


def completed_task_runs(prefix: str) -> int:
    """Task runs named ``prefix``* that this test session's Prefect API recorded as completed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterState
    from prefect.client.schemas.filters import TaskRunFilterStateType as StateType

    with get_client(sync_client=True) as client:
        return len(client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_=prefix), state=TaskRunFilterState(type=StateType(any_=["COMPLETED"]))),
            limit=200))


@pytest.mark.slow
def test_evaluate_runs_its_per_sample_batches_on_dask_and_scores_as_in_process(trained, tmp_path):
    from radsynth.configs import load_config
    from radsynth.flows.stages import evaluate_flow, generate_flow
    from radsynth.pipelines.scoring.evaluate import evaluate

    path, run_dir, result = trained
    model = {"model_dir": result["model_dir"], "model_hash": result["model_hash"]}
    samples = [f"scoring.sample_dir={tmp_path / 'samples'}", "scoring.batch_size=4"]
    generate_flow(str(path), samples, **model)
    in_process = evaluate(load_config(path, samples), model_dir=result["model_dir"], out_dir=tmp_path / "in-process",
                          log=lambda _: None)
    before = completed_task_runs("score-batch")
    fanned = evaluate_flow(str(path), [*samples, "runtime.task_runner=dask", "runtime.workers=2"], **model)
    # 12 samples in batches of 4: three per feature space and three of pixel nearest neighbours, each a task.
    spaces = len(in_process.scorecard.settings["feature_spaces"])
    assert completed_task_runs("score-batch") - before == 3 * (spaces + 1)
    rows = {name: json.loads(Path(paths).read_text())["rows"] for name, paths in
            (("in process", in_process.paths["json"]), ("dask", fanned["json"]))}
    assert len(rows["dask"]) == len(rows["in process"])
    for ours, theirs in zip(rows["dask"], rows["in process"]):
        assert ours["metric"] == theirs["metric"] and ours["feature_space"] == theirs["feature_space"]
        expected = theirs["value"] if theirs["value"] is None else pytest.approx(theirs["value"], rel=1e-3, abs=1e-5)
        assert ours["value"] == expected, ours["metric"]


def test_a_worker_that_does_not_share_the_runs_filesystem_is_refused_in_one_line(tmp_path):
    from radsynth.flows.runners import check_shared_folders

    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(UserInputError, match=r"runtime.cluster_address: on the worker at .*, the model at .* is not "
                                             r"there.*same paths"):
        check_shared_folders(tmp_path / "elsewhere", tmp_path / "samples")
    (model / "model_index.json").write_text("{}")
    (tmp_path / "readonly").write_text("a file where the sample folder should be")
    with pytest.raises(UserInputError, match="readonly cannot be written"):
        check_shared_folders(model, tmp_path / "readonly")
    check_shared_folders(model, tmp_path / "samples")
    assert list((tmp_path / "samples").iterdir()) == []  # the probe leaves nothing behind


@pytest.mark.slow
def test_the_flows_make_pairs_and_key_them_on_the_mask_models_weights(tmp_path, prefect_server):
    from radsynth.flows.stages import generate_flow, train_flow

    path, run_dir = build_config(tmp_path, "pairs", "conditioning.use_masks=true", "controlnet.max_steps=2",
                                 "controlnet.batch_size=4", "controlnet.segmenter_steps=5", "sampling.pairs=true",
                                 "sampling.lesions=[nodule 30 mm in right lung]", "sampling.num_samples=4")
    trained = train_flow(str(path))
    generated = generate_flow(str(path), model_dir=trained["model_dir"], model_hash=trained["model_hash"])
    assert set(generated["tasks"].values()) == {"Completed"}
    sidecars = [json.loads(p.read_text()) for p in sorted((run_dir / "samples").glob("syn_*.json"))]
    assert len(sidecars) == 4 and all(s["mask_source"] == "edited" and s["label_file"] for s in sidecars)
    assert {s["model_hash"] for s in sidecars} == {trained["model_hash"]}  # the hash covers the ControlNet
    # A retrained ControlNet changes that hash, so the shards sample again instead of coming from the cache.
    retuned = train_flow(str(path), ["controlnet.learning_rate=1e-3"])
    assert retuned["tasks"]["train"] == "Completed" and retuned["model_hash"] != trained["model_hash"]
    again = generate_flow(str(path), ["controlnet.learning_rate=1e-3"], model_dir=retuned["model_dir"],
                          model_hash=retuned["model_hash"])
    assert set(again["tasks"].values()) == {"Completed"}


@pytest.mark.slow
def test_transient_failures_are_retried_and_user_errors_fail_at_once_with_their_message(trained, monkeypatch):
    from prefect import flow

    import radsynth.flows.tasks as tasks

    path, run_dir, _ = trained
    from radsynth.configs import load_config

    config = load_config(str(path))
    calls = []
    real_ingest = tasks.ingest

    def flaky(config, progress):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("network share went away")
        return real_ingest(config, progress=progress)

    monkeypatch.setattr(tasks, "ingest", flaky)
    quick = tasks.ingest_task.with_options(retry_delay_seconds=0)

    @flow
    def ingest_only() -> dict:
        state = quick(config, return_state=True)
        return {"failed": state.is_failed(), "message": state.message}

    assert not ingest_only()["failed"] and len(calls) == 2

    def broken(config, progress):
        calls.append(1)
        raise UserInputError("data.root", "no cases found", "a folder of PNGs")

    calls.clear()
    monkeypatch.setattr(tasks, "ingest", broken)
    state = ingest_only()
    assert state["failed"] and len(calls) == 1, "a user error is not retried"
    assert "data.root: no cases found" in state["message"]


def test_cli_build_with_bad_input_exits_2_with_one_line(tmp_path):
    path, _ = build_config(tmp_path, "bad", "data.format=image_folder", "data.modality=xray",
                          f"data.root={tmp_path / 'missing'}")
    done = radsynth("build", str(path), "--json")
    assert done.returncode == USER_ERROR_EXIT
    errors = [line for line in done.stderr.splitlines() if line.startswith("radsynth: error:")]
    assert len(errors) == 1 and "missing" in errors[0], done.stderr[-2000:]


# ----------------------------------------------------------------------------------- accelerate launch


@pytest.mark.slow
def test_training_runs_under_accelerate_launch_when_the_config_asks(tmp_path, prefect_server):
    from radsynth.flows.stages import train_flow

    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "num_processes": 1, "num_machines": 1,
        "machine_rank": 0, "use_cpu": True, "mixed_precision": "no", "gpu_ids": "all"}))
    path, run_dir = build_config(tmp_path, "launched", f"runtime.launch.config_file={accelerate_config}")
    result = train_flow(str(path))
    assert result["tasks"]["train"] == "Completed" and "accelerate.commands.launch" in result["launched"]
    assert (run_dir / "model" / "model_index.json").is_file() and len(result["model_hash"]) == 64


# ----------------------------------------------------------------------------------------- deployments


def test_prefect_yaml_has_a_loadable_deployment_per_flow():
    from prefect.flows import load_flow_from_entrypoint

    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    flows = {load_flow_from_entrypoint(d["entrypoint"]).name: d for d in project["deployments"]}
    assert set(flows) == {"build", "train", "generate", "evaluate", "release"}
    assert flows["build"]["schedules"][0]["cron"] == "0 2 * * 0"


def test_serve_without_a_server_explains_and_exits_2(tmp_path):
    path, _ = build_config(tmp_path, "served")
    done = radsynth("serve", str(path), "--cron", "0 2 * * 0")
    assert done.returncode == USER_ERROR_EXIT
    assert "PREFECT_API_URL" in done.stderr and "prefect server start" in done.stderr


@pytest.mark.slow
def test_a_scheduled_build_on_a_loopback_server_runs_and_releases(tmp_path):
    import httpx

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = clean_env(PREFECT_HOME=str(tmp_path / "server-home"))
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=server_env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    path, run_dir = build_config(tmp_path, "scheduled")
    serving = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("prefect server did not start within 180 s")
        env = clean_env(PREFECT_API_URL=api)
        serving = subprocess.Popen([sys.executable, "-m", "radsynth.flows.cli", "serve", str(path),
                                    "--cron", "0 2 * * 0", "--name", "weekly"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = httpx.Client(base_url=api, timeout=10)
        deployment = None
        while time.time() < deadline + 120 and deployment is None:
            found = client.post("/deployments/filter", json={"deployments": {"name": {"any_": ["weekly"]}}}).json()
            deployment = found[0] if found else time.sleep(1)
        assert deployment is not None, "serve did not register the deployment"
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * 0"]
        assert deployment["parameters"]["config"] == str(path.resolve())

        run = {}
        for _ in range(30):  # a busy SQLite server can answer with an error for a moment: ask again
            run = client.post(f"/deployments/{deployment['id']}/create_flow_run", json={}).json()
            if "id" in run:
                break
            time.sleep(2)
        assert "id" in run, run
        state = None
        deadline = time.time() + 500
        while time.time() < deadline:
            state = client.get(f"/flow_runs/{run['id']}").json()["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(2)
        assert state == "COMPLETED", state
        release = run_dir / "release" / "demo-cxr-phantom"
        assert (release / "latest").resolve().name == "v1" and (release / "v1" / "report.html").is_file()
    finally:
        for process in (serving, server):
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)


class Payload:
    """A pickle that runs code when loaded: it writes the file it names."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
@pytest.mark.parametrize("serializer", [{"type": "pickle", "picklelib": "pickle", "picklelib_version": None},
                                        {"type": "json", "jsonlib": "pickle", "object_encoder": None,
                                         "object_decoder": None, "dumps_kwargs": {}, "loads_kwargs": {}}])
def test_a_pickle_planted_in_the_prefect_result_store_never_runs_and_the_task_runs_again(trained, tmp_path, serializer):
    import base64
    import pickle

    from prefect.settings import get_current_settings

    from radsynth.configs import load_config
    from radsynth.flows.stages import train_flow
    from radsynth.flows.tasks import _train_key, data_sha256

    path, run_dir, first = trained
    assert train_flow(str(path))["tasks"]["train"] == "Cached"
    config = load_config(path)
    key = _train_key(None, {"config": config, "data_sha256": data_sha256(config)})
    record = Path(get_current_settings().results.local_storage_path) / key
    records = {record: json.loads(record.read_text())}
    assert records[record]["metadata"]["serializer"]["object_decoder"] is None  # written as plain JSON
    marker = tmp_path / "payload-ran"
    for record, content in records.items():
        payload = pickle.dumps(Payload(marker))
        content["metadata"]["serializer"] = serializer
        content["result"] = base64.b64encode(payload).decode() if serializer["type"] == "pickle" else payload.decode("latin-1")
        record.write_text(json.dumps(content))
    again = train_flow(str(path))
    assert again["tasks"]["train"] == "Completed" and again["model_hash"] == first["model_hash"]  # refused, redone
    assert not marker.exists()
    assert all(json.loads(r.read_text())["metadata"]["serializer"]["type"] == "json" for r in records)
