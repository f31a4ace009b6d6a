#!/usr/bin/env python3
"""The dry run of launch/k8s_jobset.yaml: what each pod of the Indexed Job would run, with its
environment, and whether the pieces agree (pod count, process count, coordinator address).

    python launch/k8s_dry_run.py [launch/k8s_jobset.yaml]

Nothing is applied; `kubectl apply --dry-run=server -f ...` checks the manifest against a cluster.
Exits 2 with one line when the manifest contradicts itself or cannot be read (e.g. completions 4 but
LLAMAHOME_NUM_PROCESSES 2).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import yaml


def job_and_service(documents: list[dict]) -> tuple[dict, dict | None]:
    job = next(d for d in documents if d and d.get("kind") == "Job")
    service = next((d for d in documents if d and d.get("kind") == "Service"), None)
    return job, service


def pod_lines(job: dict, service: dict | None) -> list[str]:
    """Two lines per pod index: its environment, and the command it runs."""
    spec = job["spec"]
    pods = spec["completions"]
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    problems = []
    if spec.get("parallelism", pods) != pods:
        problems.append(f"parallelism {spec['parallelism']} != completions {pods}")
    if int(env.get("LLAMAHOME_NUM_PROCESSES", pods)) != pods:
        processes = env["LLAMAHOME_NUM_PROCESSES"]
        problems.append(f"LLAMAHOME_NUM_PROCESSES {processes} != completions {pods}")
    subdomain = spec["template"]["spec"].get("subdomain")
    host = f"{job['metadata']['name']}-0.{subdomain}"
    if not env.get("LLAMAHOME_COORDINATOR", "").startswith(host + ":"):
        problems.append(f"LLAMAHOME_COORDINATOR {env.get('LLAMAHOME_COORDINATOR')!r} is not pod 0 "
                        f"({host}:<port>)")
    if service is not None and service["metadata"]["name"] != subdomain:
        problems.append(f"the Service is {service['metadata']['name']!r} but the pods' subdomain "
                        f"is {subdomain!r}")
    if problems:
        raise ValueError("; ".join(problems))
    command = container.get("command", []) + container.get("args", [])
    lines = []
    for i in range(pods):
        pod_env = {**env, "JOB_COMPLETION_INDEX": str(i)}
        script = " ".join(command[2:]) if command[:2] == ["bash", "-c"] else shlex.join(command)
        script = script.replace("$JOB_COMPLETION_INDEX", str(i))
        lines.append(f"pod {i}: env " + " ".join(f"{k}={v}" for k, v in pod_env.items()))
        lines.append(f"pod {i}: {script}")
    return lines


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else Path(__file__).with_name("k8s_jobset.yaml"))
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
        lines = pod_lines(*job_and_service(documents))
    except ValueError as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 2
    except (OSError, yaml.YAMLError, StopIteration, KeyError) as e:
        reason = " ".join(str(e).split()) or "no Job in it"
        print(f"error: {path}: not a manifest this dry run reads: {type(e).__name__} {reason}",
              file=sys.stderr)
        return 2
    print(f"dry run: kubectl apply -f {path}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
