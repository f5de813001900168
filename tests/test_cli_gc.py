"""The console script keeps the cyclic garbage collector off while a job starts up, then turns it back on."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import pytest

from vlmtag.cli import pause_collector, resume_collector


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def collector_state():
    yield
    gc.unfreeze()
    gc.enable()


def test_collector_is_off_during_start_up_and_back_on_after(collector_state):
    timer = pause_collector(0.2)
    assert not gc.isenabled()
    made_at_start_up = Node()  # lives as long as the process, as modules and classes do
    timer.join(5)
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0
    assert not any(o is made_at_start_up for o in gc.get_objects())  # frozen: never traversed again

    garbage = Node()
    gone = weakref.ref(garbage)
    del garbage
    # no gc.collect() (it collects even with the collector off): enough new objects for an automatic pass
    kept = [[] for _ in range(2 * gc.get_threshold()[0])]
    assert gone() is None  # cycles made after start-up are collected
    del kept


def test_resume_early_and_twice_is_harmless(collector_state):
    timer = pause_collector(60)
    resume_collector()
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    resume_collector()
    assert gc.get_freeze_count() == frozen
    timer.cancel()


def test_the_console_script_starts_with_the_collector_off():
    # entry() as `vlmtag` runs it, with a main that reports the collector's state while the command runs
    code = ("import gc, vlmtag.cli as cli; cli.main = lambda: print(gc.isenabled(), flush=True) or 3; cli.entry()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.stdout, done.returncode) == ("False\n", 3)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_child_forked_during_start_up_collects(collector_state):
    timer = pause_collector(60)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its collector must be on, or nothing would ever turn it on
        os.write(write, b"1" if gc.isenabled() else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    timer.cancel()
    assert (answer, gc.isenabled()) == (b"1", False)
