"""AWS Batch, offline: the tiny flow launched with `--with batch` against a moto server (S3 + Batch) and a
real `mlflow server`, every submitted job's own command run as a container would run it (tests/offline_aws.py:
fresh working directory and HOME, only the job's environment, the code package from S3). Nothing but
Metaflow artifacts, the S3 datastore and the tracking server crosses a step boundary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from offline_aws import QUEUE, REPO, BatchEmulator, MlflowServer

# Two sampling tasks: the run fans the built-in task's sampling out (--sampling_workers 2).
STEPS = ["start", "sample_builtin_task", "sample_builtin_task", "preprocess", "validate", "train_reward_model", "prepare_prompts", "join", "reinforce",
         "evaluate", "register", "deploy", "inference", "end"]
STAGES = {"preprocess", "validate", "train_reward_model", "prepare_prompts", "reinforce", "evaluate",
          "register", "deploy", "inference"}
# Set at launch only: must not reach any job (a container sees only the job's environment).
LAUNCHER_ONLY = "RLHF_TEST_LAUNCHER_ONLY"


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    # One intra-op thread: the "containers" share 2 cores here (a real job gets its own vCPUs).
    with BatchEmulator(root / "jobs", extra_job_env={"OMP_NUM_THREADS": "1"}) as emulator, \
            MlflowServer(root / "mlflow") as tracking:
        (root / "jobs").mkdir(exist_ok=True)
        yield emulator, tracking, root


def launch(aws, name: str, tracking_uri: str | None, *args: str, config: str = "include: configs/tiny.yaml\n",
           extra_env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """`python flows/rlhf.py --config cfg run.yaml run --with batch:...` from an empty directory, with the
    environment a user with `metaflow configure aws` has; run.yaml includes configs/tiny.yaml (found from
    the project), so the jobs show that an include is resolved at launch and travels as values: the
    containers have neither file."""
    emulator, _, root = aws
    cwd, home = root / name, root / f"{name}-home"
    cwd.mkdir()
    home.mkdir()
    (cwd / "run.yaml").write_text(config)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "USERNAME": "tester", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", LAUNCHER_ONLY: "1", **emulator.env, **(extra_env or {})}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    cmd = [sys.executable, str(REPO / "flows" / "rlhf.py"), "--config", "cfg", "run.yaml", "run",
           "--with", f"batch:image=rlhf-lightning:test,queue={QUEUE}", "--max-workers", "2",
           "--run-id-file", "run-id", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    return done, env


def client_data(env: dict, cwd: Path, code: str):
    """Run `code` with Metaflow's Client API against the S3 datastore in a fresh process (Metaflow reads its
    configuration at import); it prints one JSON document."""
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def batch_run(aws):
    emulator, tracking, root = aws
    already = len(emulator.jobs)
    # A reward function beside the reward model: its module must import in the containers.
    done, env = launch(aws, "launch", tracking.url, "--sampling_workers", "2", config=(
        "include: configs/tiny.yaml\n"
        "reward: {functions: [{function: 'rlhf_lightning.data.arithmetic:number_only', weight: 0.1}]}\n"))
    jobs = emulator.jobs[already:]
    if done.returncode != 0:  # the failing job's own output says why
        failed = [j for j in jobs if j["exit_code"] != 0]
        pytest.fail(f"flow failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}\n"
                    + "\n".join(f"--- {j['name']}\n{j['log'][-5000:]}" for j in failed))
    run_id = (root / "launch" / "run-id").read_text().strip()
    return done, env, jobs, run_id


def test_every_step_ran_as_its_own_batch_job_in_a_fresh_container(batch_run, aws):
    done, env, jobs, run_id = batch_run
    assert sorted(j["name"].split("-")[-3] for j in jobs) == sorted(STEPS), [j["name"] for j in jobs]
    assert jobs[0]["name"].endswith("-start-1-0") and jobs[-1]["name"].split("-")[-3] == "end"
    assert all(j["exit_code"] == 0 for j in jobs)
    assert len({j["cwd"] for j in jobs}) == len({j["home"] for j in jobs}) == len(STEPS)
    tracking_url = aws[1].url
    for job in jobs:
        assert "Code package downloaded." in job["log"], job["name"]  # from (moto) S3, not the checkout
        assert LAUNCHER_ONLY not in job["env"] and job["env"]["HOME"] == str(job["home"])
        # Carried by the flow (@environment from remote_ready), not repeated with --with environment.
        assert job["env"]["MLFLOW_TRACKING_URI"] == tracking_url and job["env"]["HF_HUB_OFFLINE"] == "1"
        # Nothing of the checkout: the flow and the library come from the code package.
        assert str(REPO) not in " ".join(job["command"]) and str(REPO) not in job["env"].get("PYTHONPATH", "")
    # The steps that train or sample from the policy ask Batch for a GPU, as their @resources say.
    gpus = {j["name"].split("-")[-3]: j["resources"].get("GPU") for j in jobs}
    assert {step for step, gpu in gpus.items() if gpu == "1"} == {"sample_builtin_task", "train_reward_model",
                                                                   "reinforce", "evaluate"}


def test_the_tracking_server_holds_the_whole_run(batch_run, aws):
    _, env, jobs, run_id = batch_run
    client = MlflowClient(tracking_uri=aws[1].url, registry_uri=aws[1].url)
    exp = client.get_experiment_by_name("rlhf-lightning")
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`metaflow.run_id` = '{run_id}'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    stages = {c.data.tags["stage"]: c for c in children}
    assert set(stages) == STAGES
    assert all(c.info.status == "FINISHED" for c in children)
    assert len(client.get_metric_history(stages["reinforce"].info.run_id, "ppo/kl")) == 2
    # The reward function's term, per iteration and in the evaluation; the reward model registered as a
    # model of its own from the container that trained it, through the server.
    assert len(client.get_metric_history(stages["reinforce"].info.run_id, "ppo/reward/number_only")) == 2
    assert "eval/reward/number_only" in stages["evaluate"].data.metrics
    (rm_version,) = client.search_model_versions(
        f"name = 'rlhf-reward' and run_id = '{stages['train_reward_model'].info.run_id}'")
    assert rm_version.tags["lineage.mlflow_parent_run_id"] == parent.info.run_id
    # Artifacts went through the server, not onto a shared disk.
    assert client.list_artifacts(stages["validate"].info.run_id, "validation")

    (version,) = client.search_model_versions(f"name = 'rlhf-policy' and run_id = '{stages['register'].info.run_id}'")
    tags = version.tags
    assert tags["lineage.metaflow.run_id"] == run_id
    assert tags["lineage.mlflow_parent_run_id"] == parent.info.run_id
    assert tags["lineage.ppo_run_id"] == stages["reinforce"].info.run_id
    assert tags["lineage.reward_model_run_id"] == stages["train_reward_model"].info.run_id
    assert tags["lineage.evaluate_run_id"] == stages["evaluate"].info.run_id
    # The base is stored once, through the server, and referenced; the containers that load the model
    # (register's serving check, deploy's load check, inference's server) each fetched it into their own
    # fresh HOME, from the server.
    assert tags["base.store"] == "shared"
    (base_run,) = client.search_runs([exp.experiment_id], f"tags.`rlhf.base.digest` = '{tags['base.digest']}'")
    assert base_run.info.run_id == tags["base.run_id"] and client.list_artifacts(base_run.info.run_id, "base")
    fetched = {j["name"].split("-")[-3] for j in jobs
               if (Path(j["home"]) / ".cache" / "rlhf-lightning" / "bases" / tags["base.digest"] / "config.json").is_file()}
    assert fetched == {"register", "deploy", "inference"}, fetched
    aliases = client.get_model_version("rlhf-policy", version.version).aliases
    promoted = tags["gate.promote"] == "True"
    assert "candidate" in aliases and ("champion" in aliases) == promoted
    assert stages["inference"].data.tags["champion.decision"].startswith("promoted" if promoted else "champion not moved")
    # The built-in task's samples went to the datastore, for the next container or run to reuse.
    import boto3

    s3 = boto3.client("s3", endpoint_url=aws[0].endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    listed = s3.list_objects_v2(Bucket="rlhf-metaflow", Prefix="metaflow/rlhf_lightning_cache/builtin/")
    keys = {o["Key"].rsplit("/", 1)[-1] for o in listed.get("Contents", [])}
    assert {"MANIFEST.json", "preferences.jsonl", "prompts.jsonl", "eval_prompts.jsonl", "stats.json"} <= keys
    # The training steps' checkpoints too: where a retry on another machine, or a resume, reads them.
    for step, last in (("reinforce", "batch-00000002.ckpt"), ("train_reward_model", None)):
        listed = s3.list_objects_v2(Bucket="rlhf-metaflow",
                                    Prefix=f"metaflow/rlhf_lightning/checkpoints/RLHFFlow/{run_id}/{step}/")
        names = [o["Key"].rsplit("/", 1)[-1] for o in listed.get("Contents", [])]
        assert names and (last is None or names[-1] == last), (step, names)
    # The deployment the inference step checked, recorded where every container finds it.
    deployment = json.loads(client.get_registered_model("rlhf-policy").tags["deployment.rlhf-local.rlhf-policy-candidate"])
    assert deployment["version"] == version.version


def test_artifacts_cross_steps_through_s3_and_inference_passed(batch_run, aws):
    _, env, _, run_id = batch_run
    data = client_data(env, aws[2] / "launch", f"""
import json
from metaflow import Run, namespace
namespace(None)
run = Run("RLHFFlow/{run_id}")
report = run["inference"].task.data.served.report
print(json.dumps({{"ok": report["ok"], "checks": [[c["name"], c["ok"]] for c in report["checks"]],
                   "endpoint": vars(run["deploy"].task.data.endpoint), "successful": run.successful,
                   "shards": sorted([len(t.data.responses), t.index] for t in run["sample_builtin_task"]),
                   "pairs": len(run["preprocess"].task.data.data.pref_train)}}))
""")
    assert data["successful"] and data["ok"]
    # The built-in task's 2 x 3 sampling jobs (2 samples of 48 prompts in batches of 16), 3 in each task,
    # joined into the preference pairs the next steps train on.
    assert data["shards"] == [[3, 0], [3, 1]] and data["pairs"] > 0
    assert data["checks"][:2] == [["alias.candidate", True], ["deployment.model_uri", True]]
    assert all(ok for _, ok in data["checks"])
    # What deploy hands to inference names the deployment, never a local address or process.
    assert set(data["endpoint"]) == {"target", "name", "model_uri", "alias", "version"}


def test_the_registered_reward_model_loads_by_uri_in_a_fresh_container(batch_run, aws, tmp_path):
    """What a later run's steps do with `reward_model.pretrained: models:/rlhf-reward/N`, in a container that
    shares nothing with the one that trained it: the model comes from the tracking server and scores as
    the reward model the training container logged."""
    from rlhf_lightning.models.reward_model import PUBLISHED_FILE, RewardScorer

    _, env, _, run_id = batch_run
    client = MlflowClient(tracking_uri=aws[1].url, registry_uri=aws[1].url)
    exp = client.get_experiment_by_name("rlhf-lightning")
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`metaflow.run_id` = '{run_id}'")
    (rm_run,) = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                                        "and tags.stage = 'train_reward_model'")
    (version,) = client.search_model_versions(f"name = 'rlhf-reward' and run_id = '{rm_run.info.run_id}'")
    fresh = aws[2] / "reuse-reward-model"
    (fresh / "home").mkdir(parents=True)
    reference = {"model": f"models:/rlhf-reward/{version.version}", "input": "trained", "max_length": 64,
                 "mean": 0.0, "std": 1.0}
    scores = client_data({**env, "HOME": str(fresh / "home")}, fresh, f"""
import json
from pathlib import Path
from rlhf_lightning.models.reward_model import RewardScorer
Path("ref").mkdir()
Path("ref/{PUBLISHED_FILE}").write_text({json.dumps(json.dumps(reference))})
scorer = RewardScorer.load("ref")
print(json.dumps(scorer.score(["Review a cafe.", "Describe a park."], ["Lovely coffee.", "Dirty and loud."]).tolist()))
""")
    logged = client.download_artifacts(rm_run.info.run_id, "reward_model", str(tmp_path))
    expected = RewardScorer.load(logged).score(["Review a cafe.", "Describe a park."], ["Lovely coffee.", "Dirty and loud."])
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)


def test_remote_steps_with_a_local_tracking_store_stop_at_start(aws):
    """No MLFLOW_TRACKING_URI at launch: each container would log into its own sqlite file. The run
    stops in `start` with what to set, before anything else is submitted, and without a traceback."""
    emulator = aws[0]
    already = len(emulator.jobs)
    done, _ = launch(aws, "no-tracking", None)
    assert done.returncode != 0
    jobs = emulator.jobs[already:]
    assert [j["name"].split("-")[-3] for j in jobs] == ["start"]
    log = jobs[0]["log"]
    assert "rlhf-lightning stopped the run" in log and "Set MLFLOW_TRACKING_URI to a tracking server" in log
    assert "steps start, sample_builtin_task, preprocess and 10 more run on other machines" in log and "sqlite:///" in log
    assert "Traceback" not in log


def _state_machine(aws, config: Path, where: str) -> tuple[dict, set]:
    """`step-functions create --only-json` of the flow on `config`: (its Batch states' parameters by step,
    the steps inside a Map state)."""
    emulator, tracking, root = aws
    cwd = root / where
    cwd.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd), "USERNAME": "tester", "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": tracking.url, **emulator.env}
    done = subprocess.run([sys.executable, str(REPO / "flows" / "rlhf.py"), "--config", "cfg", str(config),
                           "--with", f"batch:queue={QUEUE}", "step-functions", "create", "--only-json"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    machine = json.loads(done.stdout[done.stdout.index("{"):])
    states, mapped = {}, set()

    def collect(state_map):
        for name, state in state_map.items():
            if state.get("Type") == "Task" and "ContainerOverrides" in state.get("Parameters", {}):  # Batch jobs
                states[name] = state["Parameters"]
            for branch in state.get("Branches", []):
                collect(branch["States"])
            if "Iterator" in state:  # a foreach: a Map state over its steps
                mapped.update(state["Iterator"]["States"])
                collect(state["Iterator"]["States"])

    collect(machine["States"])
    return states, mapped


def _gpus(params: dict) -> str | None:
    return {r["Type"]: r["Value"] for r in params["ContainerOverrides"].get("ResourceRequirements", [])}.get("GPU")


def test_step_functions_jobs_carry_the_same_environment_and_resources(aws):
    """`step-functions create --only-json`: every state is a Batch job whose overrides carry the tracking
    URI the flow was created with, and the GPU steps ask for a GPU. (Deploying the state machine needs
    real AWS: not run here.)"""
    tracking = aws[1]
    states, mapped = _state_machine(aws, REPO / "configs" / "tiny.yaml", "sfn")
    assert set(states) == set(STEPS)
    assert "sample_builtin_task" in mapped  # fanned out
    for name, params in states.items():
        overrides = params["ContainerOverrides"]
        job_env = {e["Name"]: e.get("Value", e.get("Value.$")) for e in overrides["Environment"]}  # .$: run-time values
        assert job_env["MLFLOW_TRACKING_URI"] == tracking.url and job_env["HF_HUB_OFFLINE"] == "1", name
        assert (_gpus(params) == "1") == (name in ("sample_builtin_task", "train_reward_model", "reinforce",
                                                   "evaluate")), name
        asked = {r["Type"]: r["Value"] for r in overrides.get("ResourceRequirements", [])}
        if name in ("register", "deploy", "inference"):  # they load the whole base
            assert asked.get("MEMORY") == "16000" and asked.get("VCPU") == "4", (name, asked)


def test_the_gpus_a_job_asks_for_follow_the_config(aws, tmp_path):
    """trainer.devices: 2 makes the training steps' jobs ask for 2 GPUs (a container has only those its
    job asked for; Lightning refuses devices=2 where it sees one), and the sampling and evaluation jobs,
    which spread their work over every GPU they have, too; a CPU accelerator asks for none."""
    import yaml

    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({"include": "configs/tiny.yaml", "trainer": {"devices": 2}}))
    states, _ = _state_machine(aws, two, "sfn-two")
    assert {name: _gpus(p) for name, p in states.items() if _gpus(p)} == {
        "train_reward_model": "2", "reinforce": "2", "sample_builtin_task": "2", "evaluate": "2"}
    # Each rank loads its own base and ddp_spawn hands the module over through /dev/shm (Docker's
    # default: 64 MB): the training jobs ask for the memory, shared memory and cores of two ranks.
    batch = aws[0]._client("batch")
    for name in ("train_reward_model", "reinforce"):
        asked = {r["Type"]: r["Value"] for r in states[name]["ContainerOverrides"]["ResourceRequirements"]}
        assert asked["MEMORY"] == "24000" and asked["VCPU"] == "8", (name, asked)
        (definition,) = batch.describe_job_definitions(jobDefinitions=[states[name]["JobDefinition"]])["jobDefinitions"]
        assert definition["containerProperties"]["linuxParameters"]["sharedMemorySize"] == 12000, name
    for name in ("sample_builtin_task", "evaluate"):  # a process per GPU, no DDP between them
        asked = {r["Type"]: r["Value"] for r in states[name]["ContainerOverrides"]["ResourceRequirements"]}
        assert asked["MEMORY"] == "24000" and asked["VCPU"] == "8", (name, asked)
    one_definition = batch.describe_job_definitions(jobDefinitions=[states["evaluate"]["JobDefinition"]])
    assert "sharedMemorySize" not in one_definition["jobDefinitions"][0]["containerProperties"].get("linuxParameters", {})
    # With the user's own data the one sampling task does nothing: it asks for no GPU and little memory.
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"include": str(two), "data": {"preferences": ["s3://data/prefs.jsonl"],
                                                                 "prompts": ["s3://data/prefs.jsonl"]}}))
    states, _ = _state_machine(aws, own, "sfn-own")
    asked = {r["Type"]: r["Value"] for r in states["sample_builtin_task"]["ContainerOverrides"]["ResourceRequirements"]}
    assert "GPU" not in asked and asked["MEMORY"] == "4000" and asked["VCPU"] == "4", asked
    assert _gpus(states["reinforce"]) == "2"
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text(yaml.safe_dump({"include": "configs/tiny.yaml", "trainer": {"accelerator": "cpu"}}))
    states, _ = _state_machine(aws, cpu, "sfn-cpu")
    assert not [name for name, p in states.items() if _gpus(p)]


def test_several_nodes_make_each_training_step_one_multi_node_job(aws):
    """trainer.num_nodes: 2 with 2 devices each. With Metaflow's metadata kept locally (which a multi-node
    job cannot work with) the launch stops before anything is submitted, saying what to set. With that
    check skipped (this emulator runs no multi-node job: it records it and fails it), the run reaches
    `train_reward_model`, submitted as one multi-node job: 2 nodes, node 0 the main one, each node's
    container asking for the GPUs, memory, cores and /dev/shm of 2 ranks, node 0 running the control task
    and node 1 a worker task that knows its node index."""
    import yaml

    emulator = aws[0]
    config = yaml.safe_dump({"include": "configs/tiny.yaml", "trainer": {"num_nodes": 2, "devices": 2},
                             "faults": {"retries": 0}})
    already = len(emulator.jobs)
    done, _ = launch(aws, "nodes-local-metadata", aws[1].url, config=config)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "Point Metaflow at its metadata service" in out and "METAFLOW_SERVICE_URL" in out, out[-3000:]
    assert "Traceback" not in out and len(emulator.jobs) == already  # nothing was submitted

    done, _ = launch(aws, "nodes", aws[1].url, config=config, extra_env={"RLHF_LIGHTNING_ALLOW_LOCAL_METADATA": "1"})
    jobs = emulator.jobs[already:]
    assert done.returncode != 0, done.stdout[-3000:]
    assert jobs and jobs[-1].get("multinode"), [j["name"] for j in jobs]  # the last one submitted
    assert not [j for j in jobs if not j.get("multinode") and j["exit_code"] != 0], "a single-node job failed"
    (multi,) = [j for j in jobs if j.get("multinode")]
    assert "train_reward_model" in multi["name"] or "train-reward-model" in multi["name"], multi["name"]
    props = multi["node_properties"]
    assert props["numNodes"] == 2 and props["mainNode"] == 0
    ranges = {r["targetNodes"]: r["container"] for r in props["nodeRangeProperties"]}
    assert set(ranges) == {"0:0", "1:1"}
    for target, container in ranges.items():
        assert container["linuxParameters"]["sharedMemorySize"] == 12000, target
    overrides = {o["targetNodes"]: o["containerOverrides"] for o in multi["node_overrides"]["nodePropertyOverrides"]}
    assert set(overrides) == {"0:0", "1:1"}
    for target, override in overrides.items():
        asked = {r["type"]: r["value"] for r in override["resourceRequirements"]}
        assert asked == {"GPU": "2", "MEMORY": "24000", "VCPU": "8"}, (target, asked)
    control, worker = overrides["0:0"]["command"][-1], overrides["1:1"]["command"][-1]
    assert "train_reward_model" in control and "--split-index 0" in control and "ubf_control" in control
    assert "--split-index $AWS_BATCH_JOB_NODE_INDEX" in worker and "ubf_task" in worker
    assert "-node-$AWS_BATCH_JOB_NODE_INDEX" in worker  # its own task id
