"""The cluster configurations under infra/: they parse, pass Ray's and KubeRay's own rules, keep token auth on,
run real job files with valid settings, and hold no secrets.

Nothing here talks to a cloud: the Ray cluster launcher configs are checked with the same schema and config
preparation `ray up` applies before its first cloud call, the KubeRay manifests against the CRD fields they use
and through the translation the in-cluster Ray autoscaler applies to them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from detect_secrets import SecretsCollection
from detect_secrets.settings import default_settings

from pipeline.config import load_config, preset_names

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBE = INFRA / "kubernetes"
DOCS = INFRA / "docs" / "pages"  # the documentation site's pages
LAUNCHER_CONFIGS = {"aws": INFRA / "aws" / "cluster.yaml", "gcp": INFRA / "gcp" / "cluster.yaml"}
MANIFESTS = ["raycluster.yaml", "rayjob-train.yaml", "rayjob-evaluate.yaml", "serviceaccount.yaml",
             "secret.example.yaml"]
RUNTIME_ENV = KUBE / "runtime-env.yaml"
JOBS = {"train_multilabel": REPO / "jobs" / "train_multilabel.py", "evaluate_map": REPO / "jobs" / "evaluate_map.py",
        "make_shards": REPO / "jobs" / "make_shards.py", "export_model": REPO / "jobs" / "export_model.py",
        "predict": REPO / "jobs" / "predict.py", "index_shards": REPO / "jobs" / "index_shards.py"}
# --config PRESET key=value ...; default demo
CONFIG_JOBS = {"train_multilabel", "evaluate_map", "make_shards", "export_model", "predict", "index_shards"}
RAY_VERSION = importlib.metadata.version("ray")  # the client's Ray: clusters must run the same version
RAY_IMAGE = re.compile(rf"^rayproject/ray:{re.escape(RAY_VERSION)}-py311-(cpu|gpu)$")

# GPUs per machine type, for GCP node types (the GCP provider does not detect resources; the config lists them).
GCP_GPUS = {"a2-highgpu-8g": 8, "a3-highgpu-8g": 8, "g2-standard-16": 1}


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_expected_files_exist() -> None:
    expected = [*LAUNCHER_CONFIGS.values(), *(KUBE / name for name in MANIFESTS), RUNTIME_ENV, INFRA / "README.md"]
    missing = [rel(p) for p in expected if not p.is_file()]
    assert not missing, f"missing infra files: {missing}"


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_every_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{rel(path)} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs), f"{rel(path)}: every document must be a mapping"


# --- Ray cluster launcher (ray up) ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(LAUNCHER_CONFIGS))
def launcher(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param, yaml.safe_load(LAUNCHER_CONFIGS[request.param].read_text())


def test_launcher_config_matches_rays_schema(launcher: tuple[str, dict[str, Any]]) -> None:
    """The JSON schema shipped in the ray package, then the same preparation + validation `ray up` runs."""
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    _, config = launcher
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    try:  # private helpers of `ray up`; the schema check above stands on its own if they move
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        pytest.skip("ray.autoscaler._private.util moved; only the JSON schema was checked")
    validate_config(prepare_config(config))


def test_launcher_config_defines_every_top_level_key(launcher: tuple[str, dict[str, Any]]) -> None:
    """`ray up` fills missing keys from Ray's defaults (which open the dashboard to 0.0.0.0): leave none missing."""
    import ray.autoscaler

    _, config = launcher
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    wanted = set(schema["properties"]) - {"metadata", "no_restart"}
    assert not wanted - set(config), f"keys left to Ray's defaults: {sorted(wanted - set(config))}"


def _node_types(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    types = dict(config["available_node_types"])
    head = types.pop(config["head_node_type"])
    return head, types


def _is_spot(node_config: dict[str, Any]) -> bool:
    market = node_config.get("InstanceMarketOptions", {}).get("MarketType")
    scheduling = node_config.get("scheduling", {})
    scheduling = scheduling if isinstance(scheduling, dict) else {}
    return market == "spot" or scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


def test_launcher_node_types(launcher: tuple[str, dict[str, Any]]) -> None:
    cloud, config = launcher
    head, workers = _node_types(config)
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU 0 so no training work lands on it"
    assert not head["resources"].get("GPU"), "the head is a CPU node"
    for name, node in workers.items():
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"], f"{name}: min_workers <= max_workers"
        if cloud == "gcp":
            machine = node["node_config"]["machineType"]
            assert machine in GCP_GPUS, f"{name}: add {machine}'s GPU count to GCP_GPUS"
            assert node["resources"].get("GPU") == GCP_GPUS[machine], f"{name}: resources.GPU must match {machine}"
            assert node["node_config"].get("serviceAccounts"), f"{name}: workers need a service account for storage"
        else:
            assert "GPU" not in node["resources"], f"{name}: leave GPU to Ray's detection from the instance type"
            assert node["node_config"].get("IamInstanceProfile"), f"{name}: workers need an instance profile for S3"
    if cloud == "aws":
        assert head["node_config"].get("IamInstanceProfile"), "the head needs an instance profile (S3 + EC2)"

    enabled = {name: node for name, node in workers.items() if node["max_workers"] > 0}
    evaluators = [name for name, node in enabled.items() if node["resources"].get("evaluator")]
    training = [name for name in enabled if name not in evaluators]
    assert len(evaluators) == 1, "exactly one enabled node type must offer the custom 'evaluator' resource"
    assert training, "at least one training node type must be enabled (max_workers > 0)"
    assert any(_is_spot(node["node_config"]) for node in workers.values()), "a spot/preemptible node type is missing"
    largest = max(workers[name]["max_workers"] for name in training) + workers[evaluators[0]]["max_workers"]
    assert config["max_workers"] >= largest, "global max_workers is below training + evaluator nodes"
    assert config["idle_timeout_minutes"] > 0 and config["upscaling_speed"] > 0


def test_launcher_keeps_token_auth_and_a_private_dashboard(launcher: tuple[str, dict[str, Any]]) -> None:
    _, config = launcher
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start, \
        "`ray start` enables token auth only with RAY_AUTH_MODE=token (or an existing token): set it on every node"
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard/job API must listen on localhost only"
    assert "0.0.0.0" not in head_start
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "nodes need the cluster token"


def test_launcher_images_match_local_ray(launcher: tuple[str, dict[str, Any]]) -> None:
    _, config = launcher
    docker = config["docker"]
    images = [docker["image"], docker.get("head_image", docker["image"]), docker.get("worker_image", docker["image"])]
    for image in images:
        assert RAY_IMAGE.match(image), f"{image}: the cluster must run rayproject/ray:{RAY_VERSION}-py311-*"
    assert docker.get("worker_image", docker["image"]).endswith("-gpu"), "GPU workers need the -gpu image"


def test_launcher_installs_cuda_torch_before_the_project(launcher: tuple[str, dict[str, Any]]) -> None:
    _, config = launcher
    commands = config["worker_setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if "torch==" in c and "whl/cu" in c)
    project_at = next(i for i, c in enumerate(commands) if "pip install" in c and "-e ~/xception-pipeline" in c)
    assert torch_at < project_at, "install the CUDA torch first so the project's torch>=2.3 keeps it"
    assert config["file_mounts"].get("~/xception-pipeline") == ".", "the checkout must be synced to the nodes"


# --- KubeRay manifests --------------------------------------------------------------------------------------------

KNOWN_KINDS = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("v1", "ServiceAccount"), ("v1", "Secret")}


def manifest_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(KUBE.glob("*.yaml")) if path != RUNTIME_ENV for doc in load_docs(path)]


def by_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path, doc in manifest_docs() if doc.get("kind") == kind]


def test_manifests_are_known_kinds() -> None:
    for path, doc in manifest_docs():
        assert (doc.get("apiVersion"), doc.get("kind")) in KNOWN_KINDS, f"{rel(path)}: unexpected apiVersion/kind"
        assert doc.get("metadata", {}).get("name"), f"{rel(path)}: metadata.name is required"
    kinds = {doc["kind"] for _, doc in manifest_docs()}
    assert {"RayCluster", "RayJob", "ServiceAccount"} <= kinds


def _containers(template: dict[str, Any], where: str) -> list[dict[str, Any]]:
    containers = template.get("spec", {}).get("containers")
    assert isinstance(containers, list) and containers, f"{where}: template.spec.containers must be a non-empty list"
    return containers


def _gpus(container: dict[str, Any], part: str) -> int:
    return int(container["resources"].get(part, {}).get("nvidia.com/gpu", 0))


def _check_container(container: dict[str, Any], where: str) -> None:
    assert container.get("name"), f"{where}: container name is required"
    assert RAY_IMAGE.match(container.get("image", "")), \
        f"{where}: image {container.get('image')!r} must be rayproject/ray:{RAY_VERSION}-py311-(cpu|gpu)"
    resources = container.get("resources", {})
    assert resources.get("requests") and resources.get("limits"), f"{where}: resources.requests and .limits required"
    assert _gpus(container, "requests") == _gpus(container, "limits"), f"{where}: GPU requests must equal limits"
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            assert source["secretRef"].get("optional") is True, \
                f"{where}: the object-store Secret is optional (workload identity is the alternative)"


def _check_string_params(params: Any, where: str) -> None:
    assert isinstance(params, dict), f"{where}: rayStartParams must be a mapping"
    bad = {k: v for k, v in params.items() if not isinstance(v, str)}
    assert not bad, f"{where}: rayStartParams values must be strings (the CRD is map[string]string): {bad}"


def _check_group_template(template: dict[str, Any], where: str) -> None:
    spec = template.get("spec", {})
    assert spec.get("serviceAccountName"), f"{where}: serviceAccountName gives the pods storage access"
    for container in _containers(template, where):
        _check_container(container, where)
        if _gpus(container, "limits"):
            assert container["image"].endswith("-gpu"), f"{where}: GPU containers need the -gpu image"
            shm = [m for m in container.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            assert shm and volumes.get(shm[0]["name"], {}).get("emptyDir", {}).get("medium") == "Memory", \
                f"{where}: GPU pods need a memory-backed /dev/shm for DataLoader workers"


def check_ray_cluster_spec(spec: dict[str, Any], where: str) -> None:
    assert spec.get("rayVersion") == RAY_VERSION, f"{where}: rayVersion must be {RAY_VERSION}"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: keep token auth on (authOptions.mode)"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: enableInTreeAutoscaling must be true"
    assert isinstance(spec.get("autoscalerOptions"), dict), f"{where}: autoscalerOptions is missing"

    head = spec.get("headGroupSpec")
    assert isinstance(head, dict), f"{where}: headGroupSpec is required"
    _check_string_params(head.get("rayStartParams"), f"{where} head")
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head must not run training (num-cpus 0)"
    assert isinstance(head.get("template"), dict), f"{where}: headGroupSpec.template is required"
    _check_group_template(head["template"], f"{where} head")
    assert not any(_gpus(c, "limits") for c in _containers(head["template"], where)), f"{where}: head has no GPU"

    groups = spec.get("workerGroupSpecs")
    assert isinstance(groups, list) and groups, f"{where}: workerGroupSpecs must be a non-empty list"
    names = [group.get("groupName") for group in groups]
    assert all(names) and len(set(names)) == len(names), f"{where}: groupName required and unique: {names}"
    for group in groups:
        at = f"{where} group {group['groupName']}"
        counts = [group.get(key) for key in ("minReplicas", "replicas", "maxReplicas")]
        assert all(isinstance(n, int) for n in counts), f"{at}: minReplicas, replicas, maxReplicas are integers"
        assert counts[0] <= counts[1] <= counts[2] or counts[1] == counts[2] == 0, \
            f"{at}: need minReplicas <= replicas <= maxReplicas, got {counts}"
        _check_string_params(group.get("rayStartParams"), at)
        assert isinstance(group.get("template"), dict), f"{at}: template is required"
        _check_group_template(group["template"], at)


def autoscaler_view(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """What the in-cluster Ray autoscaler makes of the spec (its own translation + Ray's schema validation)."""
    try:
        from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    except ImportError:
        pytest.skip("Ray's KubeRay autoscaling-config translation moved")
    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name, "namespace": "default"},
          "spec": spec}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


@pytest.mark.parametrize("path,doc", [pytest.param(p, d, id=rel(p)) for p, d in by_kind("RayCluster")])
def test_raycluster(path: Path, doc: dict[str, Any]) -> None:
    check_ray_cluster_spec(doc["spec"], rel(path))
    types = autoscaler_view(doc["spec"], doc["metadata"]["name"])
    assert types["headgroup"]["resources"]["CPU"] == 0
    workers = {name: t for name, t in types.items() if name != "headgroup"}
    assert any(t["resources"].get("GPU") == 8 and t["max_workers"] > 0 for t in workers.values()), \
        "an enabled 8-GPU training group is missing"
    assert [n for n, t in workers.items() if t["resources"].get("evaluator")] == ["eval-l4"], \
        "exactly the evaluator group offers the custom 'evaluator' resource"


@pytest.mark.parametrize("path,doc", [pytest.param(p, d, id=rel(p)) for p, d in by_kind("RayJob")])
def test_rayjob(path: Path, doc: dict[str, Any]) -> None:
    where, spec = rel(path), doc["spec"]
    assert isinstance(spec.get("entrypoint"), str) and "python jobs/" in spec["entrypoint"], f"{where}: entrypoint"
    assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: shutdownAfterJobFinishes frees the GPUs"
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec.get("rayClusterSpec"), dict), f"{where}: a RayJob brings its own rayClusterSpec"
    check_ray_cluster_spec(spec["rayClusterSpec"], where)
    types = autoscaler_view(spec["rayClusterSpec"], doc["metadata"]["name"])
    wanted = {k: v for k, v in json.loads(spec.get("entrypointResources", "{}")).items()}
    if spec.get("entrypointNumGpus"):
        wanted["GPU"] = spec["entrypointNumGpus"]
    if wanted:  # the driver must fit on some worker group, or the job waits forever
        assert any(all(t["resources"].get(k, 0) >= v for k, v in wanted.items()) and t["max_workers"] > 0
                   for name, t in types.items() if name != "headgroup"), f"{where}: no group offers {wanted}"


def test_workload_identity_and_secret_placeholders() -> None:
    accounts = {doc["metadata"]["name"]: doc for _, doc in by_kind("ServiceAccount")}
    annotations = accounts["xception-pipeline"]["metadata"].get("annotations", {})
    assert {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"} <= set(annotations)
    for path, doc in by_kind("Secret"):
        assert ".example." in path.name, f"{rel(path)}: only *.example.yaml placeholder Secrets belong in the repo"
        values = {**doc.get("stringData", {}), **doc.get("data", {})}
        assert values and all(v == "REPLACE_ME" for v in values.values()), f"{rel(path)}: placeholders only"
        assert doc["metadata"]["name"] != "xception-object-store", \
            f"{rel(path)}: applying the directory must not create the Secret the pods read"



# --- Draining a node before it goes (spot reclaims, scale-down) ------------------------------------------------------

# The grace a worker pod gets: above the drain deadline, which is far above a checkpoint commit (0.2-2.1 s measured
# on the test cluster with a small model; a full Xception checkpoint, ~250 MB, takes seconds more to upload).
DRAIN_GRACE_S = 120
DRAIN_REQUIRED = {"--address", "--node-id", "--reason", "--reason-message", "--deadline-remaining-seconds"}


@pytest.fixture(scope="module")
def drain_help() -> tuple[set[str], set[str]]:
    """The options and the --reason choices of `ray drain-node`, from its --help (the command is hidden and not
    covered by Ray's API stability guarantees: a Ray upgrade that changes it fails here)."""
    ray_cli = Path(sys.executable).with_name("ray")
    text = subprocess.run([str(ray_cli), "drain-node", "--help"], capture_output=True, text=True, check=True).stdout
    options = set(re.findall(r"^\s+(--[a-z][a-z-]*)", text, flags=re.MULTILINE))
    reasons = set(re.search(r"--reason \[([A-Z_|]+)\]", text)[1].split("|"))
    return options, reasons


def check_drain_command(argv: list[str], help_: tuple[set[str], set[str]], where: str) -> int:
    """`ray drain-node` argv against its --help: known options only, the required ones given, a known reason, a
    preemption; returns the deadline."""
    options, reasons = help_
    assert argv[:2] == ["ray", "drain-node"], f"{where}: {argv}"
    given = {arg.split("=", 1)[0] for arg in argv[2:] if arg.startswith("--")}
    assert given <= options, f"{where}: `ray drain-node` has no {sorted(given - options)} (its options: {options})"
    assert given >= DRAIN_REQUIRED, f"{where}: give {sorted(DRAIN_REQUIRED - given)}"
    reason = argv[argv.index("--reason") + 1]
    assert reason in reasons and reason == "DRAIN_NODE_REASON_PREEMPTION", f"{where}: --reason {reason}"
    return int(argv[argv.index("--deadline-remaining-seconds") + 1])


def worker_groups() -> list[tuple[str, dict[str, Any]]]:
    specs = [(rel(p), d["spec"]) for p, d in by_kind("RayCluster")]
    specs += [(rel(p), d["spec"]["rayClusterSpec"]) for p, d in by_kind("RayJob")]
    return [(f"{where} group {group['groupName']}", group) for where, spec in specs
            for group in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("where,group", [pytest.param(w, g, id=w) for w, g in worker_groups()])
def test_worker_pods_drain_their_ray_node_before_they_go(where: str, group: dict[str, Any],
                                                         drain_help: tuple[set[str], set[str]]) -> None:
    """Deleting a worker pod runs a preStop hook that drains the pod's own Ray node (its node id from a driver
    connected on the pod) with a deadline, then waits for its training workers to leave, within a grace period
    longer than that deadline."""
    spec = group["template"]["spec"]
    grace = spec.get("terminationGracePeriodSeconds")
    assert isinstance(grace, int) and grace >= DRAIN_GRACE_S, f"{where}: terminationGracePeriodSeconds >= 120"
    for container in spec["containers"]:
        command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        assert command and command[:2] == ["/bin/sh", "-c"], f"{where}: a preStop exec hook is missing"
        lines = [line.strip() for line in command[2].splitlines()]
        drain = next((line for line in lines if line.startswith("ray drain-node")), None)
        assert drain, f"{where}: the preStop hook runs no `ray drain-node`"
        deadline = check_drain_command(shlex.split(drain), drain_help, where)
        assert '--node-id "$node"' in drain and any(
            line.startswith("node=$(python -c") and "get_runtime_context().get_node_id()" in line for line in lines), \
            f"{where}: drain the pod's own node (its id from ray.get_runtime_context on the pod)"
        assert 0 < deadline < grace, f"{where}: the drain deadline must end before the grace period"
        waits = [line for line in lines if "RayTrainWorker" in line]
        assert waits and f"seq {deadline})" in waits[0], f"{where}: wait (up to the deadline) for the workers"


def _drain_module() -> Any:
    """infra/drain_on_preemption.py (a script on the nodes, not a package module), imported once."""
    if "drain_on_preemption" not in sys.modules:
        spec = importlib.util.spec_from_file_location("drain_on_preemption", INFRA / "drain_on_preemption.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["drain_on_preemption"]


def test_launcher_spot_nodes_drain_on_the_clouds_notice(launcher: tuple[str, dict[str, Any]],
                                                        drain_help: tuple[set[str], set[str]]) -> None:
    """Every worker starts the preemption watcher for its cloud after `ray start`; its `ray drain-node` uses
    options the CLI has, and a deadline inside the cloud's notice."""
    cloud, config = launcher
    _, workers = _node_types(config)
    assert any(_is_spot(node["node_config"]) for node in workers.values()), f"{cloud}: a spot node type is missing"
    commands = config["worker_start_ray_commands"]
    started = next(i for i, c in enumerate(commands) if "ray start --address=$RAY_HEAD_IP:6379" in c)
    watcher = [c for c in commands[started + 1:] if "infra/drain_on_preemption.py" in c]
    assert len(watcher) == 1 and "RAY_AUTH_MODE=token" in watcher[0], f"{cloud}: start the watcher after ray start"
    words = shlex.split(watcher[0].split("nohup", 1)[1])
    assert words[2:4] == [cloud, "$RAY_HEAD_IP:6379"] and watcher[0].rstrip().endswith("&"), watcher[0]
    module = _drain_module()
    deadline = check_drain_command(module.drain_command("10.0.0.1:6379", "ab" * 28, cloud), drain_help, cloud)
    notice = module.NOTICES[cloud]
    assert deadline == notice.deadline_s and deadline + module.POLL_S < notice.notice_s


def test_the_preemption_watcher_reads_each_clouds_notice() -> None:
    """The watcher's metadata reads against a local server answering as EC2 (IMDSv2 token, then 404 until the
    interruption is scheduled) and GCE (FALSE, then TRUE) do."""
    import http.server
    import threading

    state = {"noticed": False}

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            self._answer(200 if ok else 400, "token")

        def do_GET(self) -> None:
            if self.path.endswith("/spot/instance-action"):
                ok = state["noticed"] and self.headers.get("X-aws-ec2-metadata-token") == "token"
                self._answer(200 if ok else 404, '{"action": "terminate"}')
            else:
                ok = self.headers.get("Metadata-Flavor") == "Google"
                self._answer(200 if ok else 403, "TRUE" if state["noticed"] else "FALSE")

        def _answer(self, code: int, body: str) -> None:
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    module = _drain_module()
    aws = module.NOTICES["aws"]
    notices = {"aws": module.Notice(f"{base}/latest/meta-data/spot/instance-action", {}, aws.notice_s, aws.deadline_s,
                                    token_url=f"{base}/latest/api/token"),
               "gcp": module.Notice(f"{base}/computeMetadata/v1/instance/preempted", module.NOTICES["gcp"].headers,
                                    30, 20)}
    try:
        assert not any(module.noticed(n) for n in notices.values())
        state["noticed"] = True
        assert all(module.noticed(n) for n in notices.values())
    finally:
        server.shutdown()
    assert not module.noticed(module.Notice(f"{base}/gone", {}, 30, 20))  # no metadata server: no notice

# --- Runtime environments: the pip lists match pyproject.toml -------------------------------------------------------

OPTIONAL_PACKAGES = {"gcsfs"}  # gs:// support, not a project dependency


def runtime_envs() -> list[tuple[str, dict[str, Any]]]:
    envs = [(rel(RUNTIME_ENV), yaml.safe_load(RUNTIME_ENV.read_text()))]
    envs += [(rel(path), yaml.safe_load(doc["spec"]["runtimeEnvYAML"])) for path, doc in by_kind("RayJob")]
    return envs


def project_requirements() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower(): d for d in deps}


@pytest.mark.parametrize("where,env", [pytest.param(w, e, id=w) for w, e in runtime_envs()])
def test_runtime_env_matches_pyproject(where: str, env: dict[str, Any]) -> None:
    from packaging.requirements import Requirement
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own validation of the runtime_env fields
    listed = {Requirement(p).name.lower(): p for p in env["pip"]["packages"]}
    wanted = {name: req for name, req in project_requirements().items() if name != "ray"}  # ray is in the image
    assert set(listed) - OPTIONAL_PACKAGES == set(wanted), f"{where}: pip list != pyproject dependencies"
    for name, requirement in wanted.items():
        if name == "torch":
            pinned = Requirement(listed["torch"]).specifier
            version = next(iter(pinned)).version
            assert str(next(iter(pinned)).operator) == "==", f"{where}: pin torch"
            assert Requirement(requirement).specifier.contains(version), f"{where}: torch {version} vs {requirement}"
        else:
            assert listed[name] == requirement, f"{where}: {listed[name]!r} differs from pyproject's {requirement!r}"


# --- Job commands: real job files, real presets, valid keys ---------------------------------------------------------

SHELL_OPERATORS = {";", "&&", "||", "|", "&", ">", ">>", "2>&1"}
VALUE_FLAGS = {"--config", "--checkpoint", "--until-step", "--workers", "--images", "--labels", "--out", "--vocab",
               "--labels-kind", "--demo", "--split", "--count", "--seed", "--image-size", "--attribution", "--shards"}


@dataclass(frozen=True)
class JobCommand:
    source: str  # file:line
    text: str

    def __str__(self) -> str:
        return self.source


def _logical_lines(lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Join shell line continuations (trailing backslash); yields (first line number, joined text)."""
    start, parts = None, []
    for number, line in lines:
        start = number if start is None else start
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        yield start, " ".join([*parts, line])
        start, parts = None, []
    if parts:
        yield start, " ".join(parts)


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


JOB_IN_TEXT = re.compile(r"\bpython3?\s+\S*jobs/\S+\.py")


def find_job_commands(path: Path) -> list[JobCommand]:
    """Every `python jobs/*.py ...` command in a file: YAML values, YAML comments, Markdown text."""
    text = path.read_text()
    raw = list(enumerate(text.splitlines(), start=1))
    if path.suffix in (".yaml", ".yml"):
        comments = [(n, re.sub(r"^\s*#\s?", "", line)) for n, line in raw if line.lstrip().startswith("#")]
        found = [(n, line) for n, line in _logical_lines(comments) if JOB_IN_TEXT.search(line)]
        for value in (s for doc in load_docs(path) for s in _strings(doc)):
            for _, line in _logical_lines(list(enumerate(value.splitlines(), start=1))):
                if JOB_IN_TEXT.search(line):
                    needle = JOB_IN_TEXT.search(line).group()
                    number = next((n for n, r in raw if needle in r and not r.lstrip().startswith("#")), 0)
                    found.append((number, line))
    else:
        found = [(n, line) for n, line in _logical_lines(raw) if JOB_IN_TEXT.search(line)]
    # In Markdown prose a command is inline code: it ends at the closing backtick.
    return [JobCommand(f"{rel(path)}:{n}", line[JOB_IN_TEXT.search(line).start():].split("`")[0]) for n, line in found]


def all_job_commands() -> list[JobCommand]:
    paths = sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".md"))
    return [command for path in [*paths, REPO / "README.md"] for command in find_job_commands(path)]


def parse_job_command(text: str) -> tuple[str, list[str], str | None, list[str]]:
    """-> (job script path, its argv, --config value, key=value overrides); the last two only for config jobs."""
    tokens = shlex.split(text)
    script, argv = tokens[1], []
    for token in tokens[2:]:
        if token in SHELL_OPERATORS:
            break
        argv.append(token)
    if Path(script).stem not in CONFIG_JOBS:
        return script, argv, None, []
    preset, overrides, rest = "demo", [], iter(argv)
    for token in rest:
        if token.startswith("--"):
            flag, eq, value = token.partition("=")
            if flag in VALUE_FLAGS and not eq:
                value = next(rest, None)
            if flag == "--config":
                preset = value
        elif "=" in token:
            overrides.append(token)
        else:
            raise AssertionError(f"unexpected argument {token!r} (settings are key.sub=value)")
    return script, argv, preset, overrides


def test_job_commands_are_found_where_expected() -> None:
    """The scanner sees the commands users copy; otherwise the checks below would pass vacuously."""
    seen = {(c.source.split(":")[0], Path(parse_job_command(c.text)[0]).stem) for c in all_job_commands()}
    expected = {(rel(LAUNCHER_CONFIGS["aws"]), "train_multilabel"), (rel(LAUNCHER_CONFIGS["aws"]), "evaluate_map"),
                (rel(LAUNCHER_CONFIGS["gcp"]), "train_multilabel"), (rel(LAUNCHER_CONFIGS["gcp"]), "evaluate_map"),
                (rel(KUBE / "raycluster.yaml"), "train_multilabel"), (rel(KUBE / "raycluster.yaml"), "evaluate_map"),
                (rel(KUBE / "rayjob-train.yaml"), "train_multilabel"),
                (rel(KUBE / "rayjob-evaluate.yaml"), "evaluate_map"),
                (rel(INFRA / "README.md"), "train_multilabel"), (rel(INFRA / "README.md"), "evaluate_map"),
                ("README.md", "train_multilabel"), ("README.md", "evaluate_map"), ("README.md", "make_shards"),
                (rel(DOCS / "data.md"), "make_shards"), (rel(DOCS / "data.md"), "index_shards"),
                (rel(DOCS / "training.md"), "train_multilabel"), (rel(DOCS / "evaluation.md"), "evaluate_map"),
                (rel(DOCS / "use-your-model.md"), "train_multilabel"), (rel(DOCS / "use-your-model.md"), "predict"),
                (rel(DOCS / "use-your-model.md"), "export_model")}
    assert expected <= seen, f"commands not found: {sorted(expected - seen)}"


@pytest.mark.parametrize("command", all_job_commands(), ids=str)
def test_job_command_is_valid(command: JobCommand) -> None:
    script, argv, preset, overrides = parse_job_command(command.text)
    job = REPO / script
    assert job.parent == REPO / "jobs" and job.stem in JOBS, f"{command}: {script} is not one of {sorted(JOBS)}"
    assert job.is_file(), f"{command}: {script} does not exist"
    if job.stem in CONFIG_JOBS:
        assert preset in preset_names(), f"{command}: --config {preset!r} is not a preset ({preset_names()})"
        load_config(preset, overrides)  # raises ConfigError naming the bad key
    parse_args = getattr(_job_module(job), "parse_args", None)
    if parse_args is not None:  # the job's own argument parser accepts the flags
        try:
            parse_args(argv)
        except SystemExit as exc:
            if exc.code not in (0, None):  # 0: --help
                raise AssertionError(f"{command}: {script} rejects its arguments {argv}") from exc


_modules: dict[Path, Any] = {}


def _job_module(path: Path) -> Any:
    if path not in _modules:
        spec = importlib.util.spec_from_file_location(f"_infra_job_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[path] = module
    return _modules[path]


# --- No secrets committed: Yelp's detect-secrets (maintained, pattern and entropy plugins) over the repository ----

SCANNED = ["pipeline", "jobs", "infra", "tests", "README.md", "pyproject.toml", ".ci"]
BINARY = {".gz", ".png", ".jpg", ".tar", ".pyc"}
SECRET_ENV_NAME = re.compile(r"(?i).*(password|secret|token|access_key|api_key|private_key).*")


def scan_for_secrets(paths: list[Path]) -> list[str]:
    """`path:line: kind` for each secret detect-secrets finds; a line ending in `pragma: allowlist secret` is a
    reviewed placeholder."""
    collection = SecretsCollection()
    with default_settings():
        for path in paths:
            collection.scan_file(str(path))
    return [f"{name}:{secret.line_number}: {secret.type}" for name, secret in collection]


def repository_files() -> list[Path]:
    files = []
    for top in SCANNED:
        path = REPO / top
        candidates = [path] if path.is_file() else path.rglob("*")
        files += [p for p in candidates if p.is_file() and p.suffix not in BINARY and "__pycache__" not in p.parts]
    return sorted(files)


def test_secret_scanner_finds_planted_secrets(tmp_path: Path) -> None:
    """Built at run time so no secret-looking literal sits in this file."""
    leak = tmp_path / "leak.yaml"
    leak.write_text(f"aws_access_key_id: AKIA{'Q' * 16}\npassword: hunter2\n-----BEGIN RSA {'PRIVATE'} KEY-----\n")
    kinds = {finding.rsplit(": ", 1)[1] for finding in scan_for_secrets([leak])}
    assert {"AWS Access Key", "Secret Keyword", "Private Key"} <= kinds


def test_no_secrets_committed() -> None:
    findings = scan_for_secrets(repository_files())
    assert not findings, findings


@pytest.mark.parametrize("path", sorted(p for p in INFRA.rglob("*.yaml")), ids=rel)
def test_kubernetes_env_holds_no_literal_secret(path: Path) -> None:
    """Secrets reach pods from a Secret or workload identity, never as a literal `value:` of an env entry."""
    for node in _mappings(load_docs(path)):
        name, value = str(node.get("name", "")), node.get("value")
        if value is not None and SECRET_ENV_NAME.fullmatch(name):
            assert str(value).startswith("$"), f"{rel(path)}: env {name} has a literal value"


def _mappings(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _mappings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _mappings(value)
