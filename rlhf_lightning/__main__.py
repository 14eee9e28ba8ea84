"""Command line: the stages a user runs on their own, outside the Metaflow flow.

  python -m rlhf_lightning validate --preferences prefs.jsonl --prompts prompts.jsonl [--config cfg.yaml]
  python -m rlhf_lightning data --config configs/default.yaml
  python -m rlhf_lightning train-reward-model --config configs/default.yaml
  python -m rlhf_lightning serve --model-uri models:/rlhf-policy@champion --port 5001
  python -m rlhf_lightning infer --model models:/rlhf-policy@champion --input prompts.jsonl --output out.jsonl
  python -m rlhf_lightning promote --version 3 [--reason "..."]
  python -m rlhf_lightning rollback [--model-name rlhf-policy] [--to VERSION]

Exit codes: 0 success, 1 the data or a check failed (the message says what and where), 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from rlhf_lightning.config import FORMATS, ConfigError, RLHFConfig, load_config



def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf_lightning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    text = ("check data before launching a run: read, clean and cut it as the pipeline would, check every "
            "row, write a JSON report; exit 0 if valid, 1 if not")
    s = sub.add_parser("validate", help=text, description=text)
    s.add_argument("--preferences", nargs="+", required=True, metavar="FILE",
                   help="preference files, globs, s3:// or hf: sources (overrides data.preferences)")
    s.add_argument("--prompts", nargs="+", required=True, metavar="FILE", help="RL prompt sources (overrides data.prompts)")
    s.add_argument("--eval-prompts", nargs="+", default=None, metavar="FILE",
                   help="held-out evaluation prompt sources (overrides data.eval_prompts)")
    s.add_argument("--config", default=None,
                   help="YAML config for the layout, limits and policy tokenizer (default: the default run's, "
                        "what configs/default.yaml and the flow use); a file of configs/data/ reads a public "
                        "set as published (SHP, PKU-SafeRLHF, HelpSteer, Nectar, Chatbot Arena, UltraFeedback...)")
    s.add_argument("--format", default=None, choices=FORMATS,
                   help="record layout of every source (overrides data.format and data.prompts_format; "
                        "`mapping` reads data.field_mapping of the config)")
    s.add_argument("--prompts-format", default=None, choices=FORMATS,
                   help="record layout of the prompt sources alone (overrides data.prompts_format)")
    s.add_argument("--strict", action="store_true", help="treat warnings as errors (sets data.strict)")
    s.add_argument("--report", default="outputs/validate/validation_report.json",
                   help="where to write the JSON report (default: %(default)s)")
    for name, text in (
        ("data", "preprocess and validate the configured data; write the report under --out"),
        ("train-reward-model", "preprocess, validate and train the reward model; print held-out accuracy; register it "
                               "(registry.reward_model_name)"),
    ):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--config", default=None, help="YAML config (default: the default run's)")
        s.add_argument("--out", default="outputs/cli", help="output directory (default: %(default)s)")
    text = ("move the `champion` alias back to the version the current champion replaced (or to --to); "
            "a server started from models:/NAME@champion picks the change up when restarted")
    s = sub.add_parser("rollback", help=text, description=text)
    s.add_argument("--model-name", default="rlhf-policy", help="registered model (default: %(default)s)")
    s.add_argument("--to", default=None, metavar="VERSION", help="version to make champion (default: the previous champion)")
    text = ("make a registered version the champion by hand: it is deployed to serving.target, must serve its "
            "registered weights and answer the inference template (serving.requests), and only then does "
            "`champion` move (refused, with the failed checks, otherwise)")
    s = sub.add_parser("promote", help=text, description=text)
    s.add_argument("--version", required=True, help="the registered version to promote")
    s.add_argument("--model-name", default="rlhf-policy", help="registered model (default: %(default)s)")
    s.add_argument("--reason", default="", help="why, recorded in the version's champion.reason tag")
    s.add_argument("--config", default=None, help="YAML config whose serving section (target, requests) the "
                                                  "checks use (default: the default run's)")
    text = ("serve a registered policy version: with `mlflow models serve` (--target rlhf-local: POST /invocations, "
            "request rows or a Chat Completions body) or with vLLM's OpenAI-compatible server (--target rlhf-vllm: "
            "/v1/chat/completions with streaming and continuous batching; model name NAME/VERSION)")
    s = sub.add_parser("serve", help=text, description=text)
    s.add_argument("--model-uri", default="models:/rlhf-policy@champion", help="default: %(default)s")
    s.add_argument("--target", choices=["rlhf-local", "rlhf-vllm"], default="rlhf-local",
                   help="which server (default: %(default)s); see docs/serving.md for when to pick which")
    s.add_argument("-C", "--config", dest="target_config", action="append", default=[], metavar="KEY=VALUE",
                   help="a target config key (rlhf-vllm: adapter, dtype, enforce_eager, kv_cache_gib, "
                        "max_model_len, extra_args), repeatable")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    s.add_argument("--port", type=int, default=5001, help="port, 0 = a free one (default: %(default)s)")
    text = ("answer every row of a JSONL file ({\"prompt\"} or {\"messages\"}, optional \"id\") with a model or a "
            "served endpoint; one output row per input line, in order; resumes an interrupted run; exit 0 if "
            "every row got an answer, 1 if some rows are errors")
    s = sub.add_parser("infer", help=text, description=text)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="pyfunc model URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., a dir")
    src.add_argument("--endpoint", help="URL of a model server (`serve`), e.g. http://127.0.0.1:5001")
    s.add_argument("--input", required=True, help="JSONL input")
    s.add_argument("--output", required=True, help="JSONL output; if it exists, the run resumes after its rows")
    again = s.add_mutually_exclusive_group()
    again.add_argument("--retry-errors", action="store_true",
                       help="first answer the output's error rows again, from their input lines as they are now "
                            "(after you fixed them); the answered rows stay")
    again.add_argument("--overwrite", action="store_true", help="start the output over instead of resuming it")
    s.add_argument("--batch-size", type=int, default=8, help="input lines per request (default: %(default)s)")
    s.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's")
    s.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's)")
    s.add_argument("--top-p", type=float, default=None, help="default: the model's")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (default: none)")
    return p


def validate_command(args: argparse.Namespace) -> int:
    """`validate`: preprocess + validate without MLflow or Metaflow; the report beside `--report`."""
    import dataclasses
    import tempfile

    from rlhf_lightning.data import preprocess as pre
    from rlhf_lightning.data import validate as val

    try:
        cfg, config = _load_config(args.config), args.config
        overrides = {"preferences": args.preferences, "prompts": args.prompts, "strict": args.strict or cfg.data.strict}
        if args.eval_prompts is not None:
            overrides["eval_prompts"] = args.eval_prompts
        if args.format is not None:  # every source, the config's prompts_format included
            overrides["format"], overrides["prompts_format"] = args.format, ""
        if args.prompts_format is not None:
            overrides["prompts_format"] = args.prompts_format
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="rlhf-validate-") as tmp:
            data = pre.preprocess(cfg, tmp)  # the canonical splits are not kept: this is a check
    except ConfigError as exc:  # e.g. a prompt_length too small for the chat template
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = val.validate(data, cfg)
    path = report.write_json(args.report)
    print(val.summary(report, path))
    print(f"config: {config or 'the default run (name another with --config)'}")
    return 0 if report.ok else 1


def _load_config(path: str | None) -> RLHFConfig:
    """The YAML file `path`, else the default run's config (the dataclass defaults, which
    configs/default.yaml repeats)."""
    return load_config(path) if path else RLHFConfig()


def serve_command(args: argparse.Namespace) -> int:
    """`serve`: check what can be checked in a second (the alias exists, the port is free) before loading
    the model; stop the server's whole process group on Ctrl-C and on SIGTERM."""
    import signal

    from mlflow.exceptions import MlflowException

    from rlhf_lightning.serving.registry import RegistryError, resolve_model_uri
    from rlhf_lightning.serving.server import ModelServer, ServingError

    try:
        ref = resolve_model_uri(args.model_uri)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    config = dict(item.split("=", 1) for item in args.target_config if "=" in item)
    bad = [item for item in args.target_config if "=" not in item]
    if bad or (config and args.target == "rlhf-local"):
        print(f"error: -C takes KEY=VALUE for --target rlhf-vllm, got {args.target_config}", file=sys.stderr)
        return 2
    if args.target == "rlhf-vllm":
        if ref is None:
            print(f"error: rlhf-vllm serves registered versions (models:/NAME/VERSION or models:/NAME@ALIAS), "
                  f"got {args.model_uri}", file=sys.stderr)
            return 2
        from rlhf_lightning.serving import deployments, vllm_deployments

        try:
            settings = deployments._settings({**config, "host": args.host, "port": args.port},
                                             vllm_deployments.TARGET, vllm_deployments.DEFAULTS)
            server = vllm_deployments._vllm_server().VLLMServer(ref.name, ref.version, **settings)
        except MlflowException as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
    else:
        server = ModelServer(args.model_uri, host=args.host, port=args.port)

    def stop(signum, frame):  # SIGTERM: the same clean stop as Ctrl-C (the server is in its own group)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        with server:
            where = (f"{server.url}/v1 (OpenAI API, model {server.served_name!r})" if args.target == "rlhf-vllm"
                     else f"{server.url} (POST /invocations)")
            print(f"serving {args.model_uri} at {where} — Ctrl-C to stop", flush=True)
            server.serve_forever()
    except KeyboardInterrupt:
        pass  # stopped while starting: the context manager stopped the server group
    except ServingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return validate_command(args)
    if args.command == "infer":
        from rlhf_lightning.serving import batch_inference

        return batch_inference.main(args.model, args.endpoint, args.input, args.output, args.batch_size,
                                    {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                     "top_p": args.top_p, "seed": args.seed},
                                    retry_errors=args.retry_errors, overwrite=args.overwrite)

    if args.command == "rollback":
        from rlhf_lightning.serving.registry import RegistryError, rollback

        try:
            before, after = rollback(args.model_name, args.to)
        except RegistryError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{args.model_name}@champion: version {before} -> {after}")
        return 0
    if args.command == "promote":
        from rlhf_lightning.serving.promotion import promote_version
        from rlhf_lightning.serving.registry import RegistryError

        try:
            cfg = _load_config(args.config)
            done = promote_version(args.model_name, args.version, cfg.serving, args.reason)
        except (ConfigError, RegistryError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        checks = len(done.report.checks)
        print(f"{done.name}@champion: version {done.previous or '(none)'} -> {done.version} "
              f"({checks} serving checks passed)\nserve it: python -m rlhf_lightning serve "
              f"--model-uri models:/{done.name}@champion")
        return 0
    if args.command == "serve":
        return serve_command(args)

    from rlhf_lightning import pipeline
    from rlhf_lightning.data.formats import DataError
    from rlhf_lightning.evaluation.gates import GateError
    from rlhf_lightning.data.validate import DataValidationError

    try:
        cfg = _load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parent = pipeline.start(cfg, flow_name=f"cli-{args.command}", run_id=str(int(time.time())))
    try:
        data = pipeline.preprocess(cfg, parent, os.path.join(args.out, "preprocess"))
        pipeline.validate(cfg, parent, data, os.path.join(args.out, "validate"))
        print(f"data ok: {len(data.pref_train)} train pairs, {len(data.pref_eval)} eval pairs, "
              f"{len(data.rl_prompts)} RL prompts, {len(data.eval_prompts)} eval prompts")
        if args.command == "train-reward-model":
            bundle = pipeline.train_reward_model(cfg, parent, data, os.path.join(args.out, "reward_model"))
            print({k: round(v, 4) for k, v in bundle.metrics.items()})
    except (DataError, DataValidationError, ConfigError, GateError) as exc:
        pipeline.tracking.end_parent_run(parent, status="FAILED")
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pipeline.tracking.end_parent_run(parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
