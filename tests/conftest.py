import os

# Nothing downloads from a model hub in tests: tiny models are built locally (see models/loading.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models on 2 shared cores: one intra-op thread is ~100x faster than torch's spinning pool, here
# and in the subprocesses the tests start (flow steps, model servers), which inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Metaflow needs a user name and rejects root.
os.environ.setdefault("USERNAME", "rlhf-tests")
# Served models keep the bases they download here, not in the user's ~/.cache (Batch jobs of the
# offline AWS test get a fresh HOME and no such variable: each downloads its own, as a container does).
if "RLHF_BASE_CACHE" not in os.environ:
    import tempfile

    os.environ["RLHF_BASE_CACHE"] = tempfile.mkdtemp(prefix="rlhf-test-bases-")

# torch first: imported after Metaflow's Runner has reloaded its CLI modules, torch's typing fails
# (`Type parameter ~_R without a default follows ...`) when a test unpickles an artifact.
import torch  # noqa: E402,F401

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def mlflow_tracking(tmp_path_factory) -> Path:
    """A fresh sqlite tracking + registry store per test module, set through MLFLOW_TRACKING_URI as in
    production, with the experiment `rlhf-lightning` storing artifacts under the same tmp dir (MLflow's
    default would be ./mlruns in the working directory). Yields the store's directory."""
    import mlflow
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        MlflowClient().create_experiment("rlhf-lightning", artifact_location=f"{root}/artifacts")
        mlflow.set_experiment("rlhf-lightning")
        yield root
        mlflow.set_tracking_uri(None)  # back to the environment's / MLflow's default


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """(peft model, adapter dir, base model dir) of a tiny:llama policy whose adapter visibly changes
    the outputs: fresh LoRA B matrices are zero, which would make 'adapter loaded' and 'adapter
    ignored' indistinguishable. The adapter dir also holds a PPO value head, as train_ppo writes it."""
    import torch

    from rlhf_lightning.config import PolicyConfig
    from rlhf_lightning.models import loading

    model = loading.load_policy(PolicyConfig(model="tiny:llama"), trainable=False)
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.5
    adapter_dir = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter_dir)
    torch.save({"w": torch.zeros(2)}, adapter_dir / "value_head.pt")
    return model, str(adapter_dir), loading.resolve_model("tiny:llama")


@pytest.fixture(scope="module")
def registered_policy(mlflow_tracking, tiny_policy):
    """`tiny_policy` logged and registered as `rlhf-policy` (alias `candidate`) in the module's MLflow DB."""
    import mlflow

    from rlhf_lightning.serving import registry
    from rlhf_lightning.config import from_dict

    _, adapter_dir, base_dir = tiny_policy
    cfg = from_dict({"policy": {"model": "tiny:llama"}})
    with mlflow.start_run() as run:
        return registry.log_and_register(cfg, adapter_dir, base_dir, run.info.run_id, tags={})


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: on 2 shared cores, torch's spinning intra-op threads make each generate step ~100x
    slower when other processes compete for the cores; one thread is fastest."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> str:
    """An untrained tiny BERT scorer saved as `train_reward_model` saves one: PPO's and evaluation's
    mechanics do not need a meaningful reward."""
    from rlhf_lightning.models.loading import load_reward_backbone
    from rlhf_lightning.models.reward_model import RewardScorer

    model, tok = load_reward_backbone("tiny:bert")
    out = tmp_path_factory.mktemp("rm") / "model"
    RewardScorer(model, tok, max_length=64, mean=0.0, std=1.0).save(out)
    return str(out)


@pytest.fixture(scope="module")
def s3_server():
    """A real moto S3 server on a free local port; AWS_ENDPOINT_URL points boto3 at it. Yields its URL."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.setenv(name, "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_PROFILE", raising=False)
        yield f"http://127.0.0.1:{port}"
    server.stop()


# The modules that run whole flows take minutes each, and `--dist loadscope` keeps a module on one worker:
# handed out first, they run beside the many short ones instead of after them, which the suite's wall
# time would otherwise wait for.
LONGEST_FIRST = ("test_nodes.py", "test_flow.py", "test_batch_offline.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module's own order is kept
