"""Every Ray Train behaviour `pipeline/train/ray_internals.py` relies on without a public API, checked against the
installed Ray: when a Ray version drops or changes one, the failure names the symbol and the point that needs it.
"""

import importlib
import logging
import os
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from ray.train.torch import TorchConfig

from pipeline.train import ray_internals
from pipeline.train.ray_internals import Preempted


def ray_symbol(module: str, name: str, point: int):
    """`module.name` from the installed Ray, or a failure naming it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.fail(f"Ray {ray.__version__} has no {module}.{name}: pipeline/train/ray_internals.py point {point} "
                    "relies on it; find its successor and update that module (and pyproject's tested Ray range)")


def test_point_1_the_torch_backend_hook_runs_the_handler_install_on_each_worker():
    from ray.train.backend import Backend

    assert issubclass(ray_internals.PreemptibleTorchBackend, Backend)
    torch_config = ray_internals.preemptible_torch_config(use_gpu=False, collective_timeout_s=120)
    assert torch_config.timeout_s == 120 and torch_config.backend == "gloo"
    assert ray_internals.preemptible_torch_config(True, 60).backend == "nccl"
    executed = []
    worker_group = SimpleNamespace(execute=lambda fn: executed.append(fn))
    torch_config.backend_cls().on_training_start(worker_group, torch_config)
    assert executed == [ray_internals.install_preemption_handler]


def test_point_2_ray_forwards_the_controller_settings_we_set():
    constants = "ray.train.v2._internal.constants"
    forwarded = ray_symbol(constants, "ENV_VARS_TO_PROPAGATE", 2)
    assert ray_symbol(constants, "WORKER_HEALTH_CHECK_TIMEOUT_S_ENV_VAR", 2) == ray_internals.HEALTH_CHECK_TIMEOUT_ENV
    assert ray_symbol(constants, "PREEMPTION_POLL_INTERVAL_S_ENV_VAR", 2) == ray_internals.PREEMPTION_POLL_ENV
    assert {ray_internals.HEALTH_CHECK_TIMEOUT_ENV, ray_internals.PREEMPTION_POLL_ENV} <= set(forwarded)
    assert ray_internals.controller_environment(60, 5) == {ray_internals.HEALTH_CHECK_TIMEOUT_ENV: "60",
                                                           ray_internals.PREEMPTION_POLL_ENV: "5"}


def test_point_2_the_group_shutdown_wait_is_set_in_the_controller_where_ray_reads_it(monkeypatch):
    """Ray's torch backend reads the wait inside `on_shutdown`, in the controller's process; ours sets it there
    first, unless the operator has."""
    import inspect

    ray_backend = TorchConfig().backend_cls
    name = ray_symbol("ray.train.constants", "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", 2)
    assert name == ray_internals.GROUP_SHUTDOWN_TIMEOUT_ENV
    assert "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S" in inspect.getsource(ray_backend.on_shutdown)
    seen = []
    monkeypatch.setattr(ray_backend, "on_shutdown", lambda self, group, config: seen.append(os.environ.get(name)))
    monkeypatch.setattr(os, "environ", {})  # the controller's, without the setting
    ray_internals.PreemptibleTorchBackend().on_shutdown(None, None)
    os.environ[name] = "40"
    ray_internals.PreemptibleTorchBackend().on_shutdown(None, None)
    assert seen == [str(ray_internals.GROUP_SHUTDOWN_TIMEOUT_S), "40"]


def test_point_3_a_raised_preemption_stop_spends_the_preemption_budget_not_the_failure_budget():
    from ray.train import FailureConfig
    from ray.train.v2.api.exceptions import WorkerGroupError

    policy_class = ray_symbol("ray.train.v2._internal.execution.failure_handling.default", "DefaultFailurePolicy", 3)
    decision = ray_symbol("ray.train.v2._internal.execution.failure_handling.failure_policy", "FailureDecision", 3)
    stop = pickle.loads(pickle.dumps(Preempted("preempted (SIGTERM) after step 7", step=7)))  # as Ray ships it
    assert stop.preempted and stop.step == 7 and str(stop) == "preempted (SIGTERM) after step 7"

    policy = policy_class(FailureConfig(max_failures=0, max_preemption_failures=2))
    preempted = WorkerGroupError("preempted", worker_failures={0: stop, 1: stop})
    assert [policy.make_decision(preempted) for _ in range(3)] == [decision.RETRY, decision.RETRY, decision.RAISE]
    crashed = WorkerGroupError("crashed", worker_failures={0: RuntimeError("a bug")})
    assert policy_class(FailureConfig(max_failures=0)).make_decision(crashed) == decision.RAISE


def test_point_4_a_preemption_stop_is_not_logged_with_a_traceback_but_other_errors_are(caplog):
    construct = ray_symbol(ray_internals.WORKER_ERROR_LOGGER, "construct_user_exception_with_traceback", 4)
    ray_symbol(ray_internals.REPORT_CONTEXT_MODULE, "logger", 4)
    ray_internals.quiet_ray_train_logs()
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:41197: Connection reset by peer. "
                        "This is typically caused by a remote worker...")
    lost = ray_internals.peer_lost(gloo)
    assert isinstance(lost, ray_internals.PeerLost) and "Connection reset by peer" in str(lost)
    assert ray_internals.peer_lost(RuntimeError("a bug")) is None and ray_internals.peer_lost(ValueError(str(gloo))) \
        is None
    logged = []
    for error in (Preempted("preempted (SIGTERM) after step 7", step=7), lost, RuntimeError("a bug")):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger=ray_internals.WORKER_ERROR_LOGGER):
            try:
                raise error
            except Exception as caught:
                construct(caught)
        logged.append([r.getMessage().splitlines()[0] for r in caplog.records])
    assert logged == [[], [], ["Error in training function:"]]


def test_no_other_module_of_the_product_reaches_into_ray_s_private_modules():
    """Private Ray names (`ray...._internal`, `from ray... import _X`) only in pipeline/train/ray_internals.py."""
    root = Path(__file__).resolve().parents[1]
    private = re.compile(r"\bray(\.\w+)*\._\w+|from\s+ray[\w.]*\s+import\s+\(?\s*_\w+")
    offenders = [f"{path.relative_to(root)}:{number}: {line.strip()}"
                 for folder in ("pipeline", "jobs", "infra") for path in sorted((root / folder).rglob("*.py"))
                 if path.name != "ray_internals.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert offenders == []
