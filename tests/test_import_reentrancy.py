"""An import from a finalizer, while the same thread takes a module lock, must not fail the outer import: the
control worker imports every workflow's modules afresh in its sandbox, so on Python 3.11 this failed a worker's
start at random (CPython gh-91351; worker/control.py works around it)."""

from __future__ import annotations

import importlib

from worker.control import tolerate_reentrant_imports


def test_an_import_run_by_a_finalizer_in_the_middle_of_taking_a_module_lock_leaves_the_outer_one_whole():
    bootstrap = importlib.import_module("importlib._bootstrap")
    outer, inner = bootstrap._ModuleLock("vl-test-outer"), bootstrap._ModuleLock("vl-test-inner")
    real = outer.lock

    class CollectedHere:
        """The moment the GC runs a `__del__` that imports: inside the outer acquire, same thread."""

        def __enter__(self):
            inner.acquire()
            inner.release()
            return real.__enter__()

        def __exit__(self, *exc):
            return real.__exit__(*exc)

    outer.lock = CollectedHere()
    tolerate_reentrant_imports()
    assert outer.acquire()
    outer.release()
