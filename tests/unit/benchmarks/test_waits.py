"""The thread-waits summary of a native py-spy profile (pure: the raw text is made up here)."""

from __future__ import annotations

from benchmarks.waits import classify, render, summarise

STD = "/usr/lib/python3.11"
SITE = "/venv/lib/python3.11/site-packages"
FLUSH = [
    f"Thread.run ({STD}/threading.py:982)",
    f"_worker ({STD}/concurrent/futures/thread.py:83)",
    "BatchProcessor.prepare (/repo/streams/processor.py:479)",
]
QUERY = [f"Connection.query ({SITE}/chdb/state/sqlitelike.py:756)", "0x7f00 (chdb/_chdb.abi3.so)"]


def test_a_wait_for_the_interpreter_lock() -> None:
    assert classify([*FLUSH, "take (pyarrow/lib.so)", "pthread_cond_timedwait (libc.so.6)"]) == (
        "lock wait"
    )
    # the libc frame under it unnamed: the timed wait is second from the leaf
    stack = [*FLUSH, "pthread_cond_timedwait (libc.so.6)", "0x7f9ff44a3f16 (libc.so.6)"]
    assert classify(stack) == "lock wait"
    # back from epoll, waiting for the lock: not idle
    epoll = [f"EpollSelector.select ({STD}/selectors.py:468)", "select_epoll_poll_impl (x.c:1600)"]
    assert classify([*epoll, "pthread_cond_timedwait (libc.so.6)"]) == "lock wait"


def test_store_calls_waiting_running_and_taking_the_lock_back() -> None:
    assert classify([*FLUSH, *QUERY, "pthread_cond_wait (libc.so.6)", "0x7f (libc.so.6)"]) == (
        "store waits"
    )
    assert classify([*FLUSH, *QUERY, "0x7f01 (chdb/_chdb.abi3.so)"]) == "store runs"
    back = [*FLUSH, *QUERY, "PyEval_RestoreThread (libpython3.11.so)", "take_gil (libpython)"]
    assert classify(back) == "lock wait"


def test_idle_threads() -> None:
    pool = [f"_worker ({STD}/concurrent/futures/thread.py:81)", "_queue_SimpleQueue_get (q.c:177)"]
    assert classify([*pool, "0x7f9ff44aed90 (libc.so.6)"]) == "idle"
    assert classify(["sock_call_ex (socketmodule.c:921)", "recv (libc.so.6)"]) == "idle"
    assert classify(["uv__io_poll (linux.c:1452)", "epoll_pwait (libc.so.6)"]) == "idle"
    assert classify([f"Event.wait ({STD}/threading.py:622)"]) == "idle"


def test_running() -> None:
    assert classify([*FLUSH, "_keep (/repo/streams/processor.py:144)"]) == "running"
    assert classify([*FLUSH, "PyArray_FromIter (numpy/_multiarray_umath.so)"]) == "running"


def raw_profile() -> str:
    flush = "thread (11): tally-flush_0;" + ";".join(FLUSH)
    return "\n".join(
        [
            f"{flush};_keep (/repo/streams/processor.py:144) 6",
            f"{flush};pthread_cond_timedwait (libc.so.6);0x7f (libc.so.6) 2",
            f"{flush};{';'.join(QUERY)};pthread_cond_wait (libc.so.6) 2",
            "thread (12): tally-worker;sock_call_ex (socketmodule.c:921);recv (libc.so.6) 3",
            "not a sample line",
            "",
        ]
    )


def test_summary_by_thread() -> None:
    threads = summarise(raw_profile())
    assert [t.name for t in threads] == ["tally-flush_0", "tally-worker"]
    flush, worker = threads
    assert flush.total == 10
    assert (flush.share("running"), flush.share("lock wait"), flush.share("store waits")) == (
        0.6,
        0.2,
        0.2,
    )
    assert worker.share("idle") == 1.0
    text = render(threads)
    assert "tally-flush_0" in text and "60.0%" in text and "100.0%" in text
