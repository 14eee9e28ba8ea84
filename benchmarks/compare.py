"""The project beside its peers on the same work, in one sitting: min/median throughput, peak memory and
the ratios (project / peer, project time / floor time).

  benchmarks/setup_peers.sh                       # once: the peers' venvs and the benchmark models
  .venv/bin/python benchmarks/compare.py          # reward model and PPO, 2 rounds, runs alternated
  .venv/bin/python benchmarks/compare.py --only ppo --rounds 3 --json outputs/bench.json
  .venv/bin/python benchmarks/compare.py --only rm --variant "fp32=--precision 32-true" \
      --variant "no decay=--lr-schedule constant"
  .venv/bin/python benchmarks/compare.py --sweep   # how cost grows: RM pairs and tokens, PPO tokens and batch
  .venv/bin/python benchmarks/compare.py --sweep --project-only --rounds 1   # the project's curves alone

Every run is its own process (peak RSS is the process's own). Within a round the contenders run one after
the other, in reverse order every other round, so a machine that drifts (heat, another job) weighs on all
of them alike. Run it on an idle machine.

Peers: TRL 1.16 RewardTrainer (`trl_reward.py`), TRL 1.10 PPOTrainer (`trl_ppo.py`, the last TRL with PPO)
and the raw floor (`floor.py`: generate + one forward/backward, the work PPO cannot avoid), from
$RLHF_BENCH_PEERS (default: ../shared/bench beside the repository), in the venvs `setup_peers.sh` makes
under $RLHF_BENCH_HOME (default ~/.cache/rlhf-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOME = Path(os.environ.get("RLHF_BENCH_HOME", Path.home() / ".cache" / "rlhf-bench"))
PEERS = Path(os.environ.get("RLHF_BENCH_PEERS", REPO.parent / "shared" / "bench"))

# workload -> (throughput key in each contender's SUMMARY, contenders: name -> (python, script, args))
THROUGHPUT = {"project_reward": "pairs_per_s", "trl_reward": "pairs_per_s", "project_ppo": "episodes_per_s",
              "trl_ppo": "episodes_per_s", "floor": "floor_episodes_per_s"}


def contenders(workload: str, project_args: list[str], peer_args: dict[str, list[str]]) -> dict[str, list[str]]:
    py = sys.executable
    if workload == "rm":
        return {"project": [py, str(HERE / "project_reward.py"), *project_args],
                "trl 1.16": [str(HOME / "venvs/trl116/bin/python"), str(PEERS / "trl_reward.py"), *peer_args.get("trl", [])]}
    return {"project": [py, str(HERE / "project_ppo.py"), *project_args],
            "trl 1.10": [str(HOME / "venvs/trl110/bin/python"), str(PEERS / "trl_ppo.py"), *peer_args.get("trl", [])],
            "floor": [str(HOME / "venvs/trl110/bin/python"), str(PEERS / "floor.py"), *peer_args.get("floor", [])]}


def run_one(cmd: list[str], log) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "SMOL_DIR": str(HOME / "models" / "smol_hf"), "MINILM_DIR": str(HOME / "models" / "minilm")}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log.write(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}\n")
    log.flush()
    lines = [line for line in done.stdout.splitlines() if line.startswith("SUMMARY ")]
    if done.returncode or not lines:
        raise SystemExit(f"benchmark failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    fields = dict(kv.split("=", 1) for kv in lines[-1].split()[2:] if "=" in kv)
    fields["_name"] = lines[-1].split()[1]
    fields["_wall_s"] = f"{time.perf_counter() - start:.1f}"
    return fields


def table(workload: str, results: dict[str, list[dict[str, str]]]) -> list[str]:
    """Every contender's throughput (min, median), peak memory and accuracy; then each project row's
    ratios: its throughput over each peer's (median over median) and its time over the floor's."""
    out = [f"{'':<26}{'runs':>5}{'min':>9}{'median':>9}{'peak GB':>9}{'eval acc':>16}"]
    med, peak = {}, {}
    for name, runs in results.items():
        key = THROUGHPUT[runs[0]["_name"]]
        values = [float(r[key]) for r in runs]
        med[name] = statistics.median(values)
        peak[name] = statistics.median(float(r["peak_rss_gb"]) for r in runs)
        acc = ",".join(sorted({r["eval_acc"] for r in runs})) if "eval_acc" in runs[0] else "-"
        out.append(f"{name:<26}{len(runs):>5}{min(values):>9.3f}{med[name]:>9.3f}{peak[name]:>9.2f}{acc:>16}")
    peers = [n for n in med if not n.startswith("project") and n != "floor"]
    for name in (n for n in med if n.startswith("project")):
        parts = [f"{med[name] / med[p]:.2f}x {p}'s throughput, {peak[name] / peak[p]:.2f}x its memory" for p in peers]
        if "floor" in med:  # 1.00 would be the floor itself
            parts.append(f"{med['floor'] / med[name]:.2f}x the floor's time")
        if parts:  # none with --project-only
            out.append(f"  {name}: " + "; ".join(parts))
    return [f"== {workload} ==", *out]


def sitting(workload: str, rounds: int, variants: list[tuple[str, list[str]]], peer_args, log,
            project_args: list[str] = (), project_only: bool = False) -> tuple[list[str], dict]:
    groups = contenders(workload, list(project_args), peer_args)
    if project_only:
        groups = {"project": groups["project"]}
    for label, extra in variants:
        groups[f"project {label}"] = groups["project"] + extra
    results: dict[str, list[dict]] = {name: [] for name in groups}
    for r in range(rounds):
        order = list(groups) if r % 2 == 0 else list(reversed(groups))
        for name in order:
            fields = run_one(groups[name], log)
            results[name].append(fields)
            key = THROUGHPUT[fields["_name"]]
            print(f"  round {r + 1} {name}: {key}={fields[key]} peak_rss_gb={fields.get('peak_rss_gb')}", flush=True)
    return table(workload + (f" {' '.join(project_args)}" if project_args else ""), results), results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["rm", "ppo"], action="append", help="a workload (default: both)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                    help="also run the project with these extra arguments, e.g. 'bf16=--precision bf16-mixed'")
    ap.add_argument("--sweep", action="store_true", help="the cost curves instead of the headline workloads")
    ap.add_argument("--point", action="append", default=[], metavar="FLAG=VALUE",
                    help="with --sweep: only these points, e.g. --point train-rows=4000 --point max-new-tokens=64")
    ap.add_argument("--project-only", action="store_true",
                    help="the project's rows only (its cost curves without the peers' runs, in a third of the time)")
    ap.add_argument("--json", help="write every run's SUMMARY fields here")
    ap.add_argument("--log", default=str(REPO / "outputs" / "bench.log"), help="every run's full output")
    args = ap.parse_args()
    for venv in () if args.project_only else ("trl116", "trl110"):
        if not (HOME / "venvs" / venv / "bin" / "python").exists():
            raise SystemExit(f"no {HOME}/venvs/{venv}: run benchmarks/setup_peers.sh first")
    if not args.project_only and not (PEERS / "trl_reward.py").exists():
        raise SystemExit(f"the peers' scripts are not in {PEERS}: set RLHF_BENCH_PEERS")
    variants = [(v.split("=", 1)[0], v.split("=", 1)[1].split()) for v in args.variant]
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    report, everything = [], {}
    with open(args.log, "a") as log:
        if args.sweep:
            points = {"rm": [["--train-rows", n] for n in ("1000", "2000", "4000", "8000")]
                            + [["--max-length", n] for n in ("128", "512")],
                      "ppo": [["--max-new-tokens", "64"], ["--max-new-tokens", "128"], ["--batch", "64"]]}
            peer = {"--max-new-tokens": "--response-length", "--batch": "--per-device-batch"}
            for workload in args.only or ["rm", "ppo"]:
                for point in points[workload]:
                    if args.point and f"{point[0][2:]}={point[1]}" not in args.point:
                        continue
                    trl = [peer.get(point[0], point[0]), point[1]]
                    if point[0] == "--batch":  # TRL: 64 rollouts an update = 32 x 2 accumulated
                        trl = ["--per-device-batch", str(int(point[1]) // 2), "--total-episodes", "128"]
                    peer_args = {"trl": trl, "floor": ["--response-length", point[1]] if "tokens" in point[0]
                                 else ["--batch", point[1]] if point[0] == "--batch" else []}
                    lines, results = sitting(workload, args.rounds, variants, peer_args, log, point,
                                             args.project_only)
                    report += lines
                    everything[f"{workload} {' '.join(point)}"] = results
        else:
            for workload in args.only or ["rm", "ppo"]:
                lines, results = sitting(workload, args.rounds, variants, {}, log, project_only=args.project_only)
                report += lines
                everything[workload] = results
    print("\n".join(report))
    if args.json:
        Path(args.json).write_text(json.dumps({"report": report, "runs": everything}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
