"""The rlhf-lightning pipeline as a Metaflow flow (see RLHFFlow's docstring)."""

import os
import sys

from metaflow import Config, FlowSpec, Parameter, card, config_expr, current, resources, retry, step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import rlhf_lightning  # noqa: F401  installed (`make setup`), or on PYTHONPATH in a remote task
except ImportError:
    # A checkout without installing the package. Only then is the repository root put on sys.path:
    # after an install it holds `rlhf_lightning.egg-info`, which Metaflow would record in the code
    # package as the library's distribution, with empty metadata that breaks `import mlflow` remotely.
    sys.path.insert(0, REPO)

from cards import StepCard  # noqa: E402  (flows/cards.py)
from faults import checkpoint_plan  # noqa: E402  (flows/faults.py)
from jobs import (RETRY, SAMPLE_CPUS, SAMPLE_GPUS, SAMPLE_MEMORY, TRAIN_CPUS, TRAIN_GPUS,  # noqa: E402  (flows/jobs.py)
                  TRAIN_MEMORY, TRAIN_SHM)
from nodes import over_nodes, training_node  # noqa: E402  (flows/nodes.py)
from remote import remote_ready, remote_steps, resolve_data_sources  # noqa: E402  (flows/remote.py)
from rlhf_lightning.config import ConfigError, parse_yaml_config  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.yaml")


def parse_config(text: str) -> dict:
    """`parse_yaml_config` for Metaflow's `Config`, which calls it while it reads the command line: an
    exception there prints a traceback, but a config error is the user's to fix, so it is said as one."""
    import yaml

    try:
        return parse_yaml_config(text)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except yaml.YAMLError as exc:  # Metaflow hands over the text only: its line and column say where
        print(f"error: config (the --config file): not valid YAML: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# Mutators run nearest the class first: over_nodes swaps in the steps of a run over several nodes before
# remote_ready decorates every step.
@remote_ready
@over_nodes
class RLHFFlow(FlowSpec):
    """RLHF pipeline: preference data in, a served PPO-tuned LoRA policy out.

    Steps (one MLflow parent run per flow run, one nested MLflow run per stage):

     1. start                create the MLflow parent run (and the tracking DB, once)
     2. sample_builtin_task  the built-in task's responses, fanned out (foreach) over
                             data.builtin.sampling_workers tasks; one idle task for your own data
     3. preprocess           label the responses (built-in task); read every source, clean, template,
                             truncate, split
     4. validate             check every row; stop here on errors, with a report (JSON, card, MLflow artifact)
     5. train_reward_model   Bradley-Terry reward model on the preference pairs,  } in parallel
                             registered as rlhf-reward (or reward_model.pretrained }
                             measured as published; none with reward.model_weight }
                             null: reward functions alone, docs/rewards.md)       }
     6. prepare_prompts      RL prompts and held-out evaluation prompts            }
     7. join
     8. reinforce            PPO on the LoRA policy against the reward (model and functions, weighted)
     9. evaluate             policy vs reference on held-out prompts: gold judge, reward model, KL, win rate
    10. register             MLflow pyfunc model -> Model Registry with its lineage tags, alias `candidate`
    11. deploy               the new candidate to an MLflow deployments target (serving.target; default
                             rlhf-local: recorded in the registry, load-checked with `mlflow models serve`;
                             rlhf-vllm: the same, served by vLLM's OpenAI-compatible server)
    12. inference            through the same deployments client: verify the deployed version and weights,
                             send the inference template; only then move `champion` to it, if the
                             evaluation gate promoted it
    13. end

    Run:  python flows/rlhf.py run                                  (configs/default.yaml: SmolLM2 + MiniLM)
          python flows/rlhf.py --config cfg configs/tiny.yaml run   (tiny models, ~3 minutes)
    AWS:  MLFLOW_TRACKING_URI=http://<tracking server> \
          python flows/rlhf.py run --with batch:image=<image>,queue=<queue>   (@resources move with it;
          every step runs in a fresh container: docs/scaling-out.md)
    GPUs: trainer.devices N trains on N GPUs of a machine (with generation.backend vllm, an engine on each);
          trainer.num_nodes M makes train_reward_model and reinforce @parallel steps on M machines
          (flows/nodes.py: prepare_prompts then follows the join, and evaluate joins reinforce's nodes)
    Faults: the heavy steps retry (faults.retries) and the training steps checkpoint to the datastore;
          a retry, or `python flows/rlhf.py resume` after the run died, continues from the last checkpoint
          and logs into the same MLflow parent run (docs/faults.md).
    """

    cfg = Config("cfg", default=DEFAULT_CONFIG, parser=parse_config,
                 help="YAML file of the config tree (rlhf_lightning/config.py); default configs/default.yaml")
    ppo_iterations = Parameter("ppo_iterations", type=int, default=config_expr("cfg.ppo.iterations"),
                               help="Overrides ppo.iterations: PPO rollout+update iterations.")
    promotion_margin = Parameter("promotion_margin", type=float,
                                 default=config_expr("cfg.evaluation.promotion_margin"),
                                 help="Overrides evaluation.promotion_margin: gold win rate must exceed 0.5 by this.")
    sampling_workers = Parameter("sampling_workers", type=int,
                                 default=config_expr("cfg.data.builtin.sampling_workers"),
                                 help="Overrides data.builtin.sampling_workers: tasks that sample the built-in "
                                      "task's responses in parallel (one machine each under --with batch).")
    keep_serving = Parameter("keep_serving", type=bool, default=config_expr("cfg.serving.keep_running"),
                             help="Overrides serving.keep_running: leave the endpoint up after the run.")

    def _config(self):
        """The config file with this run's Parameter overrides applied (validated again)."""
        from rlhf_lightning.config import from_dict

        tree = self.cfg.to_dict()
        tree["data"] = resolve_data_sources(tree["data"])  # remotely: the copies in the code package
        tree["ppo"]["iterations"] = self.ppo_iterations
        tree["data"]["builtin"]["sampling_workers"] = self.sampling_workers
        tree["evaluation"]["promotion_margin"] = self.promotion_margin
        tree["serving"]["keep_running"] = self.keep_serving
        return from_dict(tree)

    def _workdir(self, stage):
        return os.path.join("outputs", current.flow_name, str(current.run_id), stage)

    @step
    def start(self):
        """Create the MLflow parent run (and the tracking DB, once, before parallel steps)."""
        from rlhf_lightning import pipeline

        self.parent_run_id = pipeline.start(self._config(), flow_name=current.flow_name, run_id=current.run_id,
                                            remote_steps=remote_steps(self))
        self.sampling_shards = pipeline.sampling_shards(self._config())
        self.next(self.sample_builtin_task, foreach="sampling_shards")

    # The built-in task samples thousands of responses from the policy here: on as many GPUs as training
    # has (each samples its own share of the task's jobs), with the memory and cores of as many processes;
    # with the user's own data, on nothing much (the task does nothing).
    @resources(cpu=SAMPLE_CPUS, memory=SAMPLE_MEMORY, gpu=SAMPLE_GPUS)
    @retry(**RETRY)
    @step
    def sample_builtin_task(self):
        """This task's share of the built-in task's responses (data.builtin.sampling_workers tasks; one
        that does nothing when the config names its own data or the responses are cached)."""
        from rlhf_lightning import pipeline

        self.responses = pipeline.sample_builtin_task(self._config(), self.input)
        self.next(self.preprocess)

    @card(type="blank")
    @resources(cpu=4, memory=16000)
    @retry(**RETRY)
    @step
    def preprocess(self, inputs):
        """Label the sampled responses (the built-in task), then read, clean, template, truncate and split
        every data source."""
        from rlhf_lightning import pipeline

        self.merge_artifacts(inputs, include=["parent_run_id"])
        responses = {job: texts for task in inputs for job, texts in task.responses.items()}
        self.data = pipeline.preprocess(self._config(), self.parent_run_id, self._workdir("preprocess"), responses)
        self.next(self.validate)

    @card(type="blank")
    @step
    def validate(self):
        """Check every row; stop the run here, with a report, on errors."""
        self._validate()
        self.next(self.train_reward_model, self.prepare_prompts)

    def _validate(self):
        from rlhf_lightning import pipeline

        self.validation = pipeline.validate(self._config(), self.parent_run_id, self.data,
                                            self._workdir("validate"), card=StepCard(current.card))

    @card(type="blank")
    @resources(cpu=TRAIN_CPUS, memory=TRAIN_MEMORY, gpu=TRAIN_GPUS, shared_memory=TRAIN_SHM)
    @retry(**RETRY)
    @step
    def train_reward_model(self):
        """Train the Bradley-Terry reward model and measure its held-out accuracy (or measure the published
        one reward_model.pretrained names; nothing with reward.model_weight: null)."""
        from rlhf_lightning import pipeline

        model = pipeline.train_reward_model(self._config(), self.parent_run_id, self.data,
                                            self._workdir("reward_model"), card=StepCard(current.card),
                                            checkpoints=checkpoint_plan(self), node=training_node(self.cfg))
        if model is not None:  # None on the nodes beside node 0 of a run over several: node 0's is the model
            self.reward_model = model
        self.next(self.join)

    @step
    def prepare_prompts(self):
        """Hand the RL prompts and the held-out evaluation prompts on."""
        self._prepare_prompts()
        self.next(self.join)

    def _prepare_prompts(self):
        from rlhf_lightning import pipeline

        self.prompts = pipeline.prepare_prompts(self._config(), self.parent_run_id, self.data)

    @step
    def join(self, inputs):
        """Bring the reward model and the prompts together."""
        self.merge_artifacts(inputs, include=["parent_run_id", "data", "validation", "reward_model", "prompts"])
        self.next(self.reinforce)

    @card(type="blank")
    @resources(cpu=TRAIN_CPUS, memory=TRAIN_MEMORY, gpu=TRAIN_GPUS, shared_memory=TRAIN_SHM)
    @retry(**RETRY)
    @step
    def reinforce(self):
        """PPO on the LoRA policy against the reward model."""
        from rlhf_lightning import pipeline

        policy = pipeline.reinforce(self._config(), self.parent_run_id, self.prompts, self.reward_model,
                                    self._workdir("reinforce"), card=StepCard(current.card),
                                    checkpoints=checkpoint_plan(self), node=training_node(self.cfg))
        if policy is not None:  # None on the nodes beside node 0 of a run over several: node 0's is the policy
            self.policy = policy
        self.next(self.evaluate)

    # As many GPUs as training has: each samples and scores its share of the held-out rows.
    @card(type="blank")
    @resources(cpu=TRAIN_CPUS, memory=TRAIN_MEMORY, gpu=TRAIN_GPUS)
    @retry(**RETRY)
    @step
    def evaluate(self):
        """Policy vs reference on held-out prompts; decide promotion."""
        self._evaluate()
        self.next(self.register)

    def _evaluate(self):
        from rlhf_lightning import pipeline

        self.evaluation = pipeline.evaluate(self._config(), self.parent_run_id, self.prompts, self.reward_model,
                                            self.policy, self._workdir("evaluate"), card=StepCard(current.card))

    # The steps that load the whole base (register hashes and uploads it and runs the model once on
    # the version's example; deploy and inference serve it): Metaflow's 4 GB default holds no real model.
    @resources(cpu=4, memory=16000)
    @step
    def register(self):
        """Log the pyfunc model and register it with its lineage, as `candidate`."""
        from rlhf_lightning import pipeline

        lineage = pipeline.lineage_tags(self.parent_run_id, self.data, self.reward_model, self.policy,
                                        self.evaluation, metaflow={"flow_name": current.flow_name,
                                                                   "run_id": str(current.run_id)})
        self.model_version = pipeline.register(self._config(), self.parent_run_id, self.policy,
                                               self._workdir("register"), lineage)
        self.next(self.deploy)

    @resources(cpu=4, memory=16000)
    @step
    def deploy(self):
        """Deploy the new candidate through MLflow's deployments API (serving.target)."""
        from rlhf_lightning import pipeline

        self.endpoint = pipeline.deploy(self._config(), self.parent_run_id, self.model_version)
        self.next(self.inference)

    @card(type="blank")
    @resources(cpu=4, memory=16000)
    @step
    def inference(self):
        """Verify the deployed version and weights, send the inference template through the same
        deployments client; then move `champion` if the gate promoted this version."""
        from rlhf_lightning import pipeline

        self.served, self.model_version = pipeline.inference(
            self._config(), self.parent_run_id, self.model_version, self.endpoint, self.evaluation, card=StepCard(current.card))
        self.next(self.end)

    @step
    def end(self):
        """Close the MLflow parent run and print the summary."""
        from rlhf_lightning import pipeline

        pipeline.end(self.parent_run_id, self.model_version, self.evaluation, self.reward_model,
                     run_id=str(current.run_id))


if __name__ == "__main__":
    RLHFFlow()
