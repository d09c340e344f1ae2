"""The one background worker: bounded queue, close with a timeout, a job's error raised in the owner's thread."""

import threading

import pytest

from pipeline.background import BackgroundWorker


def test_jobs_run_in_order_and_the_queue_is_bounded():
    release, ran = threading.Event(), []
    worker = BackgroundWorker("test", max_pending=2)
    assert worker.submit(release.wait)
    for n in range(2):  # room for two behind the running one (it may not have been taken yet: then one)
        worker.submit(lambda n=n: ran.append(n), timeout_s=5)
    assert not worker.submit(lambda: ran.append("dropped"), timeout_s=0)  # full: refused at once
    assert not worker.wait(0.05) and worker.unfinished == 3
    release.set()
    assert worker.close(5) and ran == [0, 1]
    with pytest.raises(RuntimeError, match="submit after close"):
        worker.submit(lambda: None)


def test_a_jobs_error_is_raised_in_the_owner_at_the_next_call_once():
    worker = BackgroundWorker("test")
    worker.submit(lambda: 1 / 0)
    ran = []
    with pytest.raises(ZeroDivisionError):
        worker.wait()
    worker.submit(lambda: ran.append(1))  # raised once: the worker goes on
    assert worker.close(5) and ran == [1]
    worker = BackgroundWorker("test")
    worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        worker.close(5)


def test_close_gives_up_after_its_timeout_and_a_second_close_waits_again():
    release = threading.Event()
    worker = BackgroundWorker("test")
    worker.submit(release.wait)
    assert not worker.close(0.05)  # stuck: a daemon thread, never holding up the process's exit
    release.set()
    assert worker.close(5)
