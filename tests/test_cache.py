"""Shared caches in S3 (a moto server): what one container builds, the next fetches instead of rebuilding;
an upload without its manifest is never used."""

from __future__ import annotations

import json

import boto3
import pytest

from rlhf_lightning import cache
from rlhf_lightning.config import BuiltinTaskConfig, PolicyConfig
from rlhf_lightning.data import builtin


@pytest.fixture
def shared(s3_server, monkeypatch):
    s3 = boto3.client("s3")
    bucket = f"cache-{id(monkeypatch)}"
    s3.create_bucket(Bucket=bucket)
    monkeypatch.setenv("RLHF_LIGHTNING_SHARED_CACHE", f"s3://{bucket}/metaflow/rlhf_lightning_cache")
    return s3, bucket


def test_publish_then_fetch_round_trips_a_directory(shared, tmp_path):
    s3, bucket = shared
    src = tmp_path / "built"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(b"\0\1\2")
    cache.publish("gguf/model-1", src)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="metaflow/rlhf_lightning_cache/gguf/model-1/MANIFEST.json")["Body"].read())
    assert manifest == {"files": ["a.txt", "sub/b.bin"], "bytes": 8}

    dest = tmp_path / "fresh-container" / "model-1"
    dest.parent.mkdir()
    assert cache.fetch("gguf/model-1", dest)
    assert (dest / "a.txt").read_text() == "alpha" and (dest / "sub" / "b.bin").read_bytes() == b"\0\1\2"
    assert not cache.fetch("gguf/other", tmp_path / "other")
    assert not cache.fetch("gguf/model-1", dest)  # already there: the caller keeps its own copy


def test_an_upload_without_its_manifest_is_not_used(shared, tmp_path):
    s3, bucket = shared
    s3.put_object(Bucket=bucket, Key="metaflow/rlhf_lightning_cache/builtin/x/preferences.jsonl", Body=b"{}")
    assert not cache.fetch("builtin/x", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_no_shared_cache_means_local_only(monkeypatch, tmp_path):
    monkeypatch.delenv("RLHF_LIGHTNING_SHARED_CACHE", raising=False)
    assert cache.shared_root() is None and not cache.fetch("k", tmp_path / "k")
    cache.publish("k", tmp_path)  # nothing to do, nothing raised
    monkeypatch.setenv("RLHF_LIGHTNING_SHARED_CACHE", "/some/dir")
    with pytest.raises(ValueError, match="give an s3://bucket/prefix"):
        cache.shared_root()


def test_builtin_task_sampled_once_then_fetched_by_a_fresh_container(shared, tmp_path, monkeypatch, one_torch_thread):
    task = BuiltinTaskConfig(n_preference_prompts=4, responses_per_prompt=2, n_rl_prompts=2, n_eval_prompts=2,
                             max_new_tokens=4, output_dir=str(tmp_path / "first" / ".rlhf_cache"))
    policy = PolicyConfig(model="tiny:llama")
    first = builtin.generate_builtin_task(task, policy)
    written = {k: open(v).read() for k, v in first.items()}

    # A fresh container: empty working directory, and sampling would fail if it were attempted.
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again instead of fetching the shared copy")

    monkeypatch.setattr("rlhf_lightning.models.loading.load_base_causal_lm", no_sampling)
    task.output_dir = str(tmp_path / "second" / ".rlhf_cache")
    second = builtin.generate_builtin_task(task, policy)
    assert {k: open(v).read() for k, v in second.items()} == written
    assert second["stats"].startswith(str(tmp_path / "second"))


def test_builtin_task_fanned_out_gives_the_same_files_as_one_sampler(tmp_path, one_torch_thread):
    """The flow's foreach: shards sample every n-th batch of the task; joined, they write exactly the files
    one sampler writes (every batch is seeded by itself, not by the order it ran in)."""
    task = BuiltinTaskConfig(n_preference_prompts=10, n_rl_prompts=2, n_eval_prompts=2, max_new_tokens=4,
                             responses_per_prompt=3, batch_size=4, output_dir=str(tmp_path / "one"))
    policy = PolicyConfig(model="tiny:llama")
    one = builtin.sample_shard(task, policy)
    assert len(one) == 3 * 3  # 3 samples per prompt x 3 length-sorted batches of 4, 4, 2 prompts
    shards = [builtin.sample_shard(task, policy, i, 3) for i in range(3)]
    assert all(shards) and sum(len(s) for s in shards) == len(one)
    assert {job: texts for s in shards for job, texts in s.items()} == one
    written = {k: open(v).read() for k, v in builtin.generate_builtin_task(task, policy).items() if k != "stats"}
    task.output_dir = str(tmp_path / "joined")
    joined = builtin.write_task(task, policy, {job: texts for s in shards for job, texts in s.items()})
    assert {k: open(v).read() for k, v in joined.items() if k != "stats"} == written
    assert builtin.cached_task(task, policy) == joined

    # A shard that never came back: said, not written with holes.
    task.output_dir = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="3 of 9 sampling jobs have no responses"):
        builtin.write_task(task, policy, {job: texts for s in shards[:2] for job, texts in s.items()})
    assert builtin.cached_task(task, policy) is None


def test_a_4bit_policy_samples_the_builtin_task_from_its_nf4_base(tmp_path, one_torch_thread, monkeypatch):
    """Under `quantization: 4bit` the built-in task's responses come from the base as the policy loads it
    (nf4: the reference policy's, and a large base in a quarter of the memory), kept under their own
    cache key; without it the key and the files are as they were."""
    import bitsandbytes as bnb

    from rlhf_lightning.models import loading

    task = BuiltinTaskConfig(n_preference_prompts=4, n_rl_prompts=2, n_eval_prompts=2, max_new_tokens=4,
                             batch_size=4, output_dir=str(tmp_path))
    plain, nf4 = PolicyConfig(model="tiny:llama"), PolicyConfig(model="tiny:llama", quantization="4bit")
    assert builtin.cache_key(task, plain) != builtin.cache_key(task, nf4)
    sampled_with = []
    real = loading.load_base_causal_lm
    monkeypatch.setattr(loading, "load_base_causal_lm", lambda p: sampled_with.append(real(p)) or sampled_with[-1])
    responses = builtin.sample_shard(task, nf4)
    assert responses and all(len(texts) for texts in responses.values())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in sampled_with[0].modules())


def test_dequantised_policy_is_fetched_instead_of_converted(shared, tmp_path, monkeypatch):
    """A fresh container (empty RLHF_LIGHTNING_CACHE) gets the converted GGUF policy from the shared cache;
    converting again would fail here (the file is not a real GGUF)."""
    from rlhf_lightning.models import loading

    gguf = tmp_path / "pkg" / "Tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really a gguf file")
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "config.json").write_text('{"model_type": "llama"}')
    cache.publish(f"gguf/Tiny.Q4_1-{gguf.stat().st_size}", converted)

    monkeypatch.setenv("RLHF_LIGHTNING_CACHE", str(tmp_path / "fresh-home-cache"))
    out = loading._convert_gguf(gguf)
    assert out == tmp_path / "fresh-home-cache" / "gguf" / f"Tiny.Q4_1-{gguf.stat().st_size}"
    assert (out / "config.json").read_text() == '{"model_type": "llama"}'


def test_the_builtin_task_never_writes_a_pair_validation_would_reject(tmp_path):
    """A policy that answers with its end token at once (empty text), with control characters only (empty
    once cleaned, as validation cleans it) or twice the same: those pairs are dropped and counted in
    stats.json, never handed to validate."""
    task = BuiltinTaskConfig(n_preference_prompts=4, n_rl_prompts=2, n_eval_prompts=2, max_new_tokens=4,
                             responses_per_prompt=3, batch_size=4, output_dir=str(tmp_path))
    policy = PolicyConfig(model="tiny:llama")
    # One batch of 4 prompts; per prompt the three candidates are (a, b, "") / (a, a, b) / ... .
    responses = {(0, 0): ["Lovely.", "Same.", "Fine.", "Good."], (1, 0): ["", "Same.", "Nice.", "Great."],
                 (2, 0): ["Bad.", "Other.", "\x1a", "Okay."]}
    paths = builtin.write_task(task, policy, responses)
    rows = [json.loads(line) for line in open(paths["preferences"])]
    assert rows and all(r["candidate_0"].strip() and r["candidate_1"].strip() for r in rows)
    assert all(r["candidate_0"] != r["candidate_1"] for r in rows)
    stats = json.loads(open(paths["stats"]).read())
    assert stats["pairs_dropped"] == {"empty_response": 4, "same_text": 1} and stats["pairs"] == 4 * 3 - 5
    from rlhf_lightning.data.text import clean_text

    assert all(clean_text(r["candidate_0"])[0] and clean_text(r["candidate_1"])[0] for r in rows)


def test_a_sampling_step_with_two_devices_samples_its_shard_on_both(tmp_path, one_torch_thread, capsys):
    """trainer.devices: 2 (here two CPU processes, a core each): the flow's sampling task splits its shard's
    jobs over both and gets exactly the texts one process samples."""
    from rlhf_lightning import pipeline
    from rlhf_lightning.config import from_dict

    builtin_cfg = dict(n_preference_prompts=10, n_rl_prompts=2, n_eval_prompts=2, max_new_tokens=4,
                       responses_per_prompt=3, batch_size=4, output_dir=str(tmp_path))
    cfg = from_dict({"policy": {"model": "tiny:llama"}, "data": {"builtin": builtin_cfg},
                     "trainer": {"accelerator": "cpu", "devices": 2}})
    one = builtin.sample_shard(cfg.data.builtin, cfg.policy, 1, 2)
    both = pipeline.sample_builtin_task(cfg, (1, 2))
    assert "built-in task: shard 2 of 2 sampled on 2 devices at once" in capsys.readouterr().out
    assert len(one) == 4 and both == one  # 3 samples x 3 batches: jobs 1, 3, 5, 7 (of 9) are shard 1's
