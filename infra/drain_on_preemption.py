"""Drain this Ray node through Ray when its cloud announces that it will take the VM back (spot / preemptible nodes
of the Ray cluster launcher configs; KubeRay pods drain in their preStop hook instead).

    python ~/xception-pipeline/infra/drain_on_preemption.py aws $RAY_HEAD_IP:6379

`worker_start_ray_commands` in infra/aws and infra/gcp start it in the background on every worker node, after
`ray start`. It polls the instance metadata every 5 s: on AWS `spot/instance-action` (404 until EC2 schedules a spot
interruption, 2 minutes ahead), on GCP `instance/preempted` (TRUE once the 30-second preemption has begun). On a
notice it runs `ray drain-node` for its own node with reason PREEMPTION and a deadline inside the notice: Ray Train
learns of it at the next step (`ray.train.get_preemption_info`), the ranks finish that step and commit its
checkpoint, and the group restarts on other nodes from it, counted as a preemption, not as a failure. Nothing else
tells Ray: the cloud just ends the VM, and the raylet dies with it.

On-demand nodes never get a notice; the watcher only polls. It needs nothing beyond the Ray image (Python's standard
library, `ray`); the cluster's token (`RAY_AUTH_MODE=token`, ~/.ray/auth_token) authenticates its calls.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

POLL_S = 5.0
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"


@dataclass(frozen=True)
class Notice:
    """Where a cloud announces a preemption, and how long before the VM goes."""

    url: str
    headers: dict[str, str]
    notice_s: int  # the cloud's warning time
    deadline_s: int  # told to Ray: inside the warning, less the polling interval and the drain call itself
    token_url: str | None = None  # AWS IMDSv2: a session token first


NOTICES = {
    "aws": Notice("http://169.254.169.254/latest/meta-data/spot/instance-action", {}, 120, 110,
                  token_url="http://169.254.169.254/latest/api/token"),
    "gcp": Notice("http://metadata.google.internal/computeMetadata/v1/instance/preempted",
                  {"Metadata-Flavor": "Google"}, 30, 20),
}


def _get(url: str, headers: dict[str, str], method: str = "GET") -> str | None:
    """The body at `url`, or None for an HTTP error (AWS answers 404 until there is a notice) or no answer."""
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError):
        return None


def noticed(notice: Notice) -> bool:
    """Whether the metadata server announces this VM's preemption now."""
    headers = dict(notice.headers)
    if notice.token_url is not None:
        token = _get(notice.token_url, {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, method="PUT")
        if token is None:
            return False
        headers["X-aws-ec2-metadata-token"] = token
    body = _get(notice.url, headers)
    if notice.token_url is not None:
        return body is not None  # spot/instance-action exists only once EC2 has scheduled the interruption
    return (body or "").strip() == "TRUE"


def own_node_id(address: str) -> str:
    """This node's Ray node id: a driver connected from here runs on the local raylet."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


def drain_command(address: str, node_id: str, cloud: str) -> list[str]:
    """`ray drain-node` for this node, as `ray drain-node --help` spells its options."""
    notice = NOTICES[cloud]
    return ["ray", "drain-node", "--address", address, "--node-id", node_id, "--reason", DRAIN_REASON,
            "--reason-message", f"{cloud} preemption notice ({notice.notice_s} s)",
            "--deadline-remaining-seconds", str(notice.deadline_s)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cloud", choices=sorted(NOTICES))
    parser.add_argument("address", help="the head's GCS address, host:6379")
    args = parser.parse_args(argv)
    node_id = own_node_id(args.address)  # now, while nothing is urgent
    print(f"watching for a {args.cloud} preemption notice of Ray node {node_id}", flush=True)
    while not noticed(NOTICES[args.cloud]):
        time.sleep(POLL_S)
    command = drain_command(args.address, node_id, args.cloud)
    print("preemption notice: " + " ".join(command), flush=True)
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
