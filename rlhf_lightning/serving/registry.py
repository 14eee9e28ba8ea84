"""Log the tuned policy as an MLflow pyfunc model, register a version, tag its lineage, set aliases.

The logged model is `pyfunc_model.py` as models-from-code (see that module for why) with the LoRA
adapter (only the files peft needs, not the PPO value head), the tokenizer, and a reference to the base
model (`registry.base_store`): by default the base is logged once, as the artifact of a `base` run found
again by the sha256 of its files, and every version on it references that run, so ten PPO runs of one
base store it once. Tracking and registry URIs come from MLflow itself (``MLFLOW_TRACKING_URI`` or its
default); nothing here picks a server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import mlflow
import pandas as pd
from mlflow import MlflowClient

from rlhf_lightning import hardware
from rlhf_lightning.serving import pyfunc_model
from rlhf_lightning.chat import refuses_system, template_for
from rlhf_lightning.config import RLHFConfig

CANDIDATE_ALIAS = "candidate"
"""Set on every registered version: the newest policy, not yet trusted."""
CHAMPION_ALIAS = "champion"
"""The policy to serve: set only when the evaluation gates passed and the served version passed the
inference checks (:func:`promote`); :func:`rollback` moves it back."""

# Files peft needs to load an adapter; everything else in the training output dir (value head,
# optimizer state) is private training state and stays out of the served model.
ADAPTER_FILES = ("adapter_config.json", pyfunc_model.ADAPTER_WEIGHTS_FILE)

# What the served model imports (pyfunc_model.py), pinned to the versions it was logged with.
# accelerate: peft's dependency; jinja2: chat templates; not torchvision (transformers does not need it).
SERVING_PACKAGES = ("mlflow", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers",
                    "jinja2", "pandas", "numpy")


@dataclass(frozen=True)
class ModelVersionInfo:
    """A registered policy version."""

    name: str
    """Registered model name."""
    version: str
    """Model Registry version number."""
    aliases: list[str]
    """Aliases pointing at this version right after registration."""
    weights_sha256: str
    """sha256 of the adapter weights file; the served model reports the same value."""
    model_uri: str
    """`models:/<name>/<version>`: immutable, unlike an alias."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def weights_sha256(adapter_dir: str | Path) -> str:
    """sha256 of the adapter's `adapter_model.safetensors`: the identity of a trained policy."""
    path = Path(adapter_dir) / pyfunc_model.ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no adapter weights; save the adapter with peft `save_pretrained(dir)` "
            "(safetensors is peft's default)"
        )
    return pyfunc_model.sha256_file(path)


def pip_requirements() -> list[str]:
    """`pkg==version` for the serving dependencies, from the packages installed here."""
    reqs = []
    for pkg in SERVING_PACKAGES:
        # Drop local build tags (torch "2.13.0+cpu"): PyPI has no such wheel; the plain pin resolves
        # to the CPU or CUDA build that fits the serving machine.
        version = importlib.metadata.version(pkg).split("+")[0]
        reqs.append(f"{pkg}=={version}")
    return reqs


def policy_chat_template(cfg: RLHFConfig, base_model_dir: str) -> tuple[str, bool]:
    """(the chat template the policy trained with, `chat.template_for` on the base's tokenizer; whether
    it takes a system message, folded or as it is)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    template = template_for(tok, cfg.policy.chat_template, cfg.policy.fold_system)
    return template, not refuses_system(tok, template)


def _check_base_dir(base_model_dir: str) -> None:
    base = Path(base_model_dir)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"{base}: not a transformers model directory (no config.json); pass the directory written by "
            "`model.save_pretrained(dir)` and `tokenizer.save_pretrained(dir)` (e.g. loading.resolve_model(ref))"
        )
    if not (base / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{base}: no tokenizer; save it there with `tokenizer.save_pretrained(dir)`")


BASE_DIGEST_TAG = "rlhf.base.digest"
"""On a `base` run: the sha256 of its files' manifest (pyfunc_model.manifest_digest), its identity."""
BASE_COMPLETE_TAG = "rlhf.base.complete"
"""Set on a `base` run once every file is uploaded: a crashed upload is never referenced."""


def _find_base_run(client: MlflowClient, digest: str) -> str | None:
    """The id of a complete, active `base` run holding the base with this digest, in any experiment."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    for start in range(0, len(experiments), 100):  # search_runs takes at most 100 experiments per call
        runs = client.search_runs(experiments[start:start + 100], max_results=1,
                                  filter_string=f"tags.`{BASE_DIGEST_TAG}` = '{digest}' and "
                                                f"tags.`{BASE_COMPLETE_TAG}` = 'true'")
        if runs:
            return runs[0].info.run_id
    return None


def store_base(cfg: RLHFConfig, base_model_dir: str, experiment_id: str) -> tuple[dict, dict[str, str]]:
    """(the version's base_ref: where its base is and the sha256 of each file; tags for the version).

    `shared`: the base run with these files if one exists, else a new one in `experiment_id` with the
    files logged under `base/`. `hub`: the hub id at the commit the local copy came from."""
    files = pyfunc_model.base_manifest(base_model_dir)
    digest = pyfunc_model.manifest_digest(files)
    ref: dict = {"model": cfg.policy.model, "digest": digest, "files": files}
    if cfg.registry.base_store == "hub":
        snapshot = Path(base_model_dir)
        if snapshot.parent.name != "snapshots" or not snapshot.parents[1].name.startswith("models--"):
            raise RegistryError(
                f"registry.base_store: hub needs policy.model to be a hub id (its files in the hub cache); "
                f"{cfg.policy.model!r} is at {base_model_dir}, which the serving side cannot fetch from the hub. "
                f"Use base_store: shared (the default) or copy")
        ref.update(hub_id=cfg.policy.model, revision=snapshot.name)
        return ref, {"base.hub": f"{cfg.policy.model}@{snapshot.name}", "base.digest": digest}
    client = MlflowClient()
    run_id = _find_base_run(client, digest)
    if run_id is None:
        run = client.create_run(experiment_id, run_name=f"base {cfg.policy.model}"[:250], tags={
            BASE_DIGEST_TAG: digest, "rlhf.base.model": cfg.policy.model,
            "mlflow.note.content": "A base model that registered policy versions reference (their base_ref "
                                   "artifact): deleting this run breaks serving them."})
        run_id = run.info.run_id
        root = Path(base_model_dir)
        for name in files:  # file by file: exactly the files the manifest hashes, no staged copy
            parent = Path("base", name).parent.as_posix()
            client.log_artifact(run_id, str(root / name), artifact_path=parent)
        client.log_dict(run_id, files, "manifest.json")
        client.set_tag(run_id, BASE_COMPLETE_TAG, "true")
        client.set_terminated(run_id)
        print(f"stored base {cfg.policy.model} once ({len(files)} files) in run {run_id}")
    else:
        print(f"base {cfg.policy.model} already stored in run {run_id}: this version references it")
    ref.update(uri=f"runs:/{run_id}/base", run_id=run_id)
    return ref, {"base.run_id": run_id, "base.digest": digest}


@contextlib.contextmanager
def _in_run(run_id: str):
    """Log into `run_id`: the active run if it is that one, else resume it (nested under any other
    active run, since MLflow allows only one top-level active run per thread)."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield active
    else:
        with mlflow.start_run(run_id=run_id, nested=active is not None) as run:
            yield run


def _description(cfg: RLHFConfig, sha: str, run_id: str, tags: dict[str, str]) -> str:
    """The version's description: what it is and where it came from, readable in the MLflow UI."""
    lines = [f"PPO-tuned LoRA policy on `{cfg.policy.model}`, logged by run `{run_id}`.",
             f"Adapter weights sha256 `{sha}`; every served answer reports it in `weights_sha256`.", "",
             "| lineage | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(tags.items()) if not k.startswith("eval.")]
    evals = {k: v for k, v in tags.items() if k.startswith("eval.")}
    if evals:
        lines += ["", "| evaluation | value |", "|---|---|"] + [f"| {k[5:]} | {v} |" for k, v in sorted(evals.items())]
    return "\n".join(lines)


def fp32_bytes(base_model_dir: str) -> int:
    """What the base takes in memory loaded in fp32, as the served model loads it on a CPU: 4 bytes a
    parameter, the parameters counted from the safetensors headers (a `.bin` checkpoint: its size)."""
    from safetensors import safe_open

    files = sorted(Path(base_model_dir).glob("*.safetensors"))
    if not files:
        return sum(f.stat().st_size for f in Path(base_model_dir).glob("*.bin"))
    numel = 0
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                n = 1
                for dim in fh.get_slice(key).get_shape():
                    n *= dim
                numel += n
    return 4 * numel


def example_check(base_model_dir: str, available: int | None = None) -> tuple[bool, str]:
    """Whether MLflow may run the input example through the model while logging it (it loads the whole
    model in this process, in fp32 on a CPU). Not when that would take more than half the memory left:
    an 8B base needs 32 GB, and a register step killed for memory loses the run; the deploy and
    inference steps check the served model on the live endpoint anyway. (ok, why)"""
    need = fp32_bytes(base_model_dir)
    available = hardware.available_memory() if available is None else available
    if need <= available // 2:
        return True, ""
    return False, (f"the base takes {need / 2**30:.1f} GiB in fp32 and this step has {available / 2**30:.1f} GiB "
                   "left: the version is logged without an input example (MLflow would load the whole model "
                   "here to check it); its request examples are in the model's metadata, and the deploy and "
                   "inference steps check the live endpoint")


def log_and_register(cfg: RLHFConfig, adapter_dir: str, base_model_dir: str, run_id: str,
                     tags: dict[str, str]) -> ModelVersionInfo:
    """Log base + adapter as a pyfunc model in run `run_id`, register it as `cfg.registry.model_name`,
    tag the version (`tags`, the lineage, + weights_sha256, base_model, quantization), describe it, and
    alias it `candidate`. `champion` is set by :func:`promote`, once the served version passed its checks."""
    sha = weights_sha256(adapter_dir)
    _check_base_dir(base_model_dir)
    name = cfg.registry.model_name
    template = [dataclasses.asdict(r) for r in cfg.serving.requests]
    chat_template, takes_system = policy_chat_template(cfg, base_model_dir)

    with tempfile.TemporaryDirectory(prefix="rlhf-register-") as tmp:
        # MLflow names an artifact directory after its source directory: stage it as `adapter`.
        staged = Path(tmp) / "adapter"
        staged.mkdir()
        for fname in ADAPTER_FILES:
            src = Path(adapter_dir) / fname
            if not src.is_file():
                raise FileNotFoundError(f"{src}: missing; the adapter dir must come from peft `save_pretrained`")
            shutil.copy2(src, staged / fname)
        artifacts = {"adapter": str(staged)}
        base_tags: dict[str, str] = {}
        if cfg.registry.base_store == "copy":
            artifacts["base"] = base_model_dir
        else:
            from transformers import AutoTokenizer

            experiment_id = MlflowClient().get_run(run_id).info.experiment_id
            ref, base_tags = store_base(cfg, base_model_dir, experiment_id)
            (Path(tmp) / "base_ref.json").write_text(json.dumps(ref, indent=1))
            artifacts["base_ref"] = str(Path(tmp) / "base_ref.json")
            # The tokenizer travels with the version (a few MB): clients read it without the base.
            AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(Path(tmp) / "tokenizer")
            artifacts["tokenizer"] = str(Path(tmp) / "tokenizer")
        example_ok, example_note = example_check(base_model_dir)
        if not example_ok:
            print(f"register: {example_note}")
        with _in_run(run_id):
            info = mlflow.pyfunc.log_model(
                name="policy",
                python_model=pyfunc_model.__file__,  # models-from-code: MLflow copies the file
                artifacts=artifacts,
                # weights_sha256: load fails if the adapter artifact differs; chat_template: the one the
                # policy was trained with, so that serving renders prompts alike; model_name: what Chat
                # Completions answers are labelled with.
                model_config={"weights_sha256": sha, "chat_template": chat_template, "model_name": name},
                signature=pyfunc_model.SIGNATURE,
                # The chat form with every param: the example shows all the model takes. MLflow also
                # runs it through the model once as a serving check.
                # A system message only where the template takes one (fold_system off on Gemma's would
                # refuse it): the example the version is registered with is one it answers.
                input_example=(
                    pd.DataFrame({"messages": [[
                        *([{"role": "system", "content": "You are a helpful assistant."}] if takes_system else []),
                        {"role": "user", "content": template[0]["prompt"]},
                    ]]}),
                    {"max_new_tokens": min(template[0]["max_new_tokens"], 8), "temperature": 0.7,
                     "top_p": 0.9, "seed": 0},
                ) if example_ok else None,
                pip_requirements=pip_requirements(),
                metadata={"weights_sha256": sha, "base_model": cfg.policy.model, "inference_template": template,
                          "limits": pyfunc_model.LIMITS,
                          "request_examples": [
                              {"dataframe_records": [{"prompt": template[0]["prompt"]}],
                               "params": {"max_new_tokens": 32, "temperature": 0.0}},
                              {"dataframe_records": [{"messages": [{"role": "user", "content": template[0]["prompt"]}]}],
                               "params": {"max_new_tokens": 32, "temperature": 0.7, "top_p": 0.9, "seed": 1}},
                              {"inputs": [template[0]["prompt"]]},
                              {"messages": [{"role": "user", "content": template[0]["prompt"]}],
                               "max_tokens": 32, "temperature": 0.7, "seed": 1},
                          ]},
                registered_model_name=name,
            )
    version = info.registered_model_version
    if version is None:
        raise RuntimeError(f"MLflow logged {info.model_uri} but did not register it as {name!r}")
    version = str(version)

    client = MlflowClient()
    version_tags = {**tags, "weights_sha256": sha, "base_model": cfg.policy.model,
                    "quantization": cfg.policy.quantization, "base.store": cfg.registry.base_store, **base_tags,
                    "input_example": "logged; MLflow ran it through the model" if example_ok else example_note}
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.update_model_version(name, version, description=_description(cfg, sha, run_id, version_tags))
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, version)
    aliases = sorted(client.get_model_version(name, version).aliases)
    return ModelVersionInfo(name=name, version=version, aliases=aliases, weights_sha256=sha,
                            model_uri=f"models:/{name}/{version}")


REWARD_EXAMPLE = {"prompt": "Write a one-sentence review of a small seaside cafe.",
                  "response": "Lovely coffee, friendly staff and a view of the harbour."}


def register_reward_model(cfg: RLHFConfig, model_dir: str, run_id: str, tags: dict[str, str]) -> ModelVersionInfo:
    """Log the reward model trained here (`model_dir`: `RewardScorer.save`'s directory) in run `run_id` as a
    pyfunc that scores (prompt, response) rows (serving/reward_pyfunc.py, with the pair encoding it was
    measured with), register it as `registry.reward_model_name`, tag the version (`tags`: the lineage of
    its data and its held-out figures) and alias it `candidate`. A later run names it by URI
    (`reward_model.pretrained`); `rlhf_lightning serve --model-uri` serves it."""
    from rlhf_lightning import pair_encoding
    from rlhf_lightning.serving import reward_pyfunc

    name = cfg.registry.reward_model_name
    # One file or shards: the sha256 of the weights files' manifest (as a base's identity is computed).
    sha = pyfunc_model.manifest_digest({p.name: pyfunc_model.sha256_file(p)
                                        for p in sorted(Path(model_dir).glob("*.safetensors"))})
    backbone = cfg.policy.model if cfg.reward_model.backbone == "policy" else cfg.reward_model.backbone
    example_ok, example_note = example_check(model_dir)  # MLflow would load a large reward model here to check it
    if not example_ok:
        print(f"register reward model: {example_note}")
    with _in_run(run_id):
        info = mlflow.pyfunc.log_model(
            name="reward_model",
            python_model=reward_pyfunc.__file__,  # models-from-code, self-contained as the policy's
            artifacts={"reward_model": model_dir},
            code_paths=[pair_encoding.__file__],  # the encoding training measured it with, imported by name
            signature=reward_pyfunc.SIGNATURE,
            input_example=pd.DataFrame([REWARD_EXAMPLE]) if example_ok else None,
            pip_requirements=pip_requirements(),
            metadata={"weights_sha256": sha, "backbone": backbone},
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    version_tags = {**tags, "weights_sha256": sha, "backbone": backbone,
                    "finetune": cfg.reward_model.finetune}
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    lines = [f"Bradley-Terry reward model on `{backbone}`, logged by run `{run_id}`. Scores "
             "(prompt, response) rows: `score` (raw) and `score_normalised` (by the training pairs' mean and std).",
             "", "| tag | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(version_tags.items())]
    client.update_model_version(name, version, description="\n".join(lines))
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, version)
    return ModelVersionInfo(name=name, version=version, aliases=version_aliases(name, version), weights_sha256=sha,
                            model_uri=f"models:/{name}/{version}")


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (the message says why and what to do)."""


def current_champion(name: str, client: MlflowClient | None = None) -> str | None:
    """The version `name@champion` points at, or None."""
    client = client or MlflowClient()
    models = client.search_registered_models(filter_string=f"name = '{name}'")
    version = models[0].aliases.get(CHAMPION_ALIAS) if models else None
    return None if version is None else str(version)


def version_aliases(name: str, version: str) -> list[str]:
    """The aliases that point at `name` version `version` now, sorted."""
    return sorted(MlflowClient().get_model_version(name, str(version)).aliases)


def champion_adapter(name: str, base_model: str, dst_dir: str) -> tuple[tuple[str, str] | None, str]:
    """((adapter dir, label), note) of `name@champion` with only its adapter downloaded into `dst_dir`,
    to compare a new policy with; None and the reason when there is none to compare with (none yet, or
    trained on another base model than `base_model`)."""
    client = MlflowClient()
    version = current_champion(name, client)
    if version is None:
        return None, f"no {name}@{CHAMPION_ALIAS} registered yet"
    base = client.get_model_version(name, version).tags.get("base_model")
    if base != base_model:
        return None, f"{name}@{CHAMPION_ALIAS} is v{version} on base {base!r}, not {base_model!r}: not comparable"
    adapter = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}/artifacts/adapter",
                                                  dst_path=str(Path(dst_dir) / f"champion-v{version}"))
    return (adapter, f"v{version}"), f"compared with {name}@{CHAMPION_ALIAS} (v{version})"


class ModelRef(NamedTuple):
    """A registered model version: what a `models:/` URI names at the moment it is resolved."""

    name: str
    version: str


def resolve_model_uri(model_uri: str) -> ModelRef | None:
    """The (name, version) a `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/NAME/latest` URI
    names now (None for other URIs: runs:/, paths). Raises RegistryError saying what exists instead: the
    versions or aliases that do, the command that makes a champion."""
    if not model_uri.startswith("models:/"):
        return None
    ref = model_uri.removeprefix("models:/").strip("/")
    if "@" in ref:
        name, alias, version = *ref.split("@", 1), None
    elif "/" in ref:
        (name, version), alias = ref.rsplit("/", 1), None
    else:
        raise RegistryError(f"{model_uri}: name a version or an alias: models:/{ref}/VERSION, "
                            f"models:/{ref}/latest or models:/{ref}@champion")
    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        raise RegistryError(f"{model_uri}: no registered model {name!r} at {mlflow.get_registry_uri()} (run the flow "
                            "first, or point MLFLOW_TRACKING_URI at the server that has it)") from None
    if alias is not None:
        if alias in model.aliases:
            return ModelRef(name, str(model.aliases[alias]))
        have = ", ".join(f"{a} -> v{v}" for a, v in sorted(model.aliases.items())) or "none"
        raise RegistryError(f"{model_uri}: {name} has no alias {alias!r} (its aliases: {have}); serve one of those, "
                            f"or make a version champion: python -m rlhf_lightning promote --version N")
    versions = sorted((int(v.version) for v in client.search_model_versions(f"name = '{name}'")))
    if version.lower() == "latest" and versions:
        return ModelRef(name, str(versions[-1]))
    if version.isdigit() and int(version) in versions:
        return ModelRef(name, str(int(version)))
    have = f"versions {versions[0]}..{versions[-1]}" if versions else "no versions"
    raise RegistryError(f"{model_uri}: {name} has no version {version!r} (it has {have}; stages are not used here: "
                        "name a version number, `latest`, or an alias such as @champion)")


def promote(name: str, version: str, reason: str) -> str | None:
    """Point `champion` at `version`; record on it the version it replaced (`champion.previous`, what
    :func:`rollback` returns to), when and why. Returns the previous champion's version (or None)."""
    client = MlflowClient()
    previous = current_champion(name, client)
    if previous == str(version):
        return previous
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    client.set_model_version_tag(name, version, "champion.previous", str(previous or ""))
    client.set_model_version_tag(name, version, "champion.promoted_at", _now())
    client.set_model_version_tag(name, version, "champion.reason", reason)
    return previous


def rollback(name: str, to_version: str | None = None) -> tuple[str, str]:
    """Move `champion` back: to `to_version`, or to the version the current champion replaced. The
    rolled-back version keeps its other aliases and gets `champion.rolled_back_at`. Returns (from, to)."""
    client = MlflowClient()
    current = current_champion(name, client)
    if current is None:
        raise RegistryError(f"{name} has no 'champion' alias (or no such registered model): nothing to roll back "
                            f"(make a version champion with: python -m rlhf_lightning promote --version N)")
    if to_version is None:
        to_version = client.get_model_version(name, current).tags.get("champion.previous") or None
        if to_version is None:
            raise RegistryError(
                f"{name}@champion (v{current}) did not replace an earlier champion; name the version to go "
                f"back to with --to VERSION"
            )
    try:
        client.get_model_version(name, str(to_version))
    except mlflow.exceptions.MlflowException as exc:
        raise RegistryError(f"{name} version {to_version} not found: {exc.message}") from None
    if str(to_version) == str(current):
        raise RegistryError(f"{name}@champion already is version {current}")
    client.set_registered_model_alias(name, CHAMPION_ALIAS, str(to_version))
    client.set_model_version_tag(name, current, "champion.rolled_back_at", _now())
    client.set_model_version_tag(name, str(to_version), "champion.restored_at", _now())
    return str(current), str(to_version)


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
