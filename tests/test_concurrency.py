"""Callers on several Python threads (issue 8, part 4).

Every core call of a CPU model runs on one process-wide compute thread (csrc/py/py_exec.c), so only
one OpenMP thread team exists whichever Python thread calls; callbacks still run in the calling
thread; Ctrl-C, nested calls from callbacks, fork() and interpreter exit keep working. No timing
assertions: hangs are bounded by subprocess timeouts.
"""
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastload
from golden_util import model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, **kw):
    return fastload.AutoModelForCausalLM.from_pretrained(str(model_dir(name)), device_map="cpu",
                                                         torch_dtype="float32", **kw)


@pytest.fixture(scope="module")
def llama():
    return load("llama", threads=2)


@pytest.fixture(scope="module")
def qwen():
    return load("qwen2", threads=2)


def prompt(i, n=6):
    return (np.arange(n, dtype=np.int64)[None] * (i + 3) + 5 * i + 7) % 500 + 3


def run_py(code, timeout=120, env=None):
    """Run `code` in a fresh interpreter with this tree first on the path; bounded by `timeout`."""
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests"), **(env or {}))
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=e, cwd=ROOT)
    except subprocess.TimeoutExpired as ex:
        pytest.fail(f"the subprocess did not finish within {timeout} s (hang); output so far: {ex.stdout!r} {ex.stderr!r}")


# ------------------------------------------------------------------ same results as a loop
def test_threads_match_loop_generate_forward_two_models(llama, qwen):
    def call(k):
        i, kind, m = k, ("gen", "fwd")[k % 2], (llama, qwen)[(k // 2) % 2]
        if kind == "gen":
            return m.generate(prompt(i), max_new_tokens=12, do_sample=False, eos_token_id=None)
        return m(prompt(i, 9)).logits
    jobs = list(range(24))
    want = [call(k) for k in jobs]
    for workers in (1, 8):
        with ThreadPoolExecutor(workers) as ex:
            got = list(ex.map(call, jobs))
        for k, (a, b) in enumerate(zip(want, got)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"call {k}, {workers} workers")


def test_threads_match_loop_chat(demo_model, demo_tok):
    qs = [f"Name a colour, {i}." for i in range(8)]

    def ask(q):
        return demo_model.chat(demo_tok, q, max_new_tokens=6, do_sample=False)[0]
    want = [ask(q) for q in qs]
    with ThreadPoolExecutor(8) as ex:
        assert list(ex.map(ask, qs)) == want


# ------------------------------------------------------------------ one OpenMP team
def n_threads():
    return len(os.listdir("/proc/self/task"))


def test_one_openmp_team_whichever_thread_calls(llama):
    """Today each Python thread that runs a CPU model gets its own OpenMP team (threads - 1 more OS
    threads each), and libgomp throttles every team once they outnumber the CPUs."""
    llama.generate(prompt(0), max_new_tokens=3, do_sample=False)  # the team exists now
    base = n_threads()
    k = 4
    ran, hold = threading.Barrier(k + 1), threading.Barrier(k + 1)
    errors = []

    def work(i):
        try:
            llama.generate(prompt(i), max_new_tokens=3, do_sample=False)
            llama(prompt(i))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        ran.wait(timeout=60)
        hold.wait(timeout=60)  # alive while the main thread counts (a thread's team ends with it)
    ths = [threading.Thread(target=work, args=(i,)) for i in range(k)]
    for t in ths:
        t.start()
    ran.wait(timeout=60)
    during = n_threads()
    hold.wait(timeout=60)
    for t in ths:
        t.join()
    assert not errors
    # k Python threads (a transient thread of earlier work may have ended meanwhile); today 2 * k
    assert during - base <= k, f"{during - base} new OS threads for {k} Python threads: more than one OpenMP team"


# ------------------------------------------------------------------ callbacks
class Boom(Exception):
    pass


class FailingStreamer:
    def __init__(self, exc, after=3):
        self.exc, self.after, self.n, self.thread = exc, after, 0, None

    def put(self, value):
        self.thread = threading.get_ident()
        self.n += 1
        if self.n > self.after:
            raise self.exc

    def end(self):
        pass


def test_streamer_exception_reaches_the_worker_caller(llama):
    s = FailingStreamer(Boom("streamer failed at token 3"))
    with ThreadPoolExecutor(2) as ex:
        fut = ex.submit(llama.generate, prompt(1), max_new_tokens=20, do_sample=False, streamer=s)
        with pytest.raises(Boom, match="streamer failed at token 3") as ei:
            fut.result(timeout=60)
    assert s.n == 4  # generation stopped at the failing token
    assert s.thread != threading.get_ident()  # put ran in the calling (worker) thread, as before
    assert "put" in [tb.name for tb in ei.traceback], "the streamer's frame is in the traceback"


@pytest.mark.parametrize("in_worker", [False, True])
def test_streamer_keyboard_interrupt_stops_generation(llama, in_worker):
    s = FailingStreamer(KeyboardInterrupt(), after=2)
    if in_worker:
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(llama.generate, prompt(2), max_new_tokens=20, do_sample=False, streamer=s)
            with pytest.raises(KeyboardInterrupt):
                fut.result(timeout=60)
    else:
        with pytest.raises(KeyboardInterrupt):
            llama.generate(prompt(2), max_new_tokens=20, do_sample=False, streamer=s)
    assert s.n == 3
    # the model is usable afterwards
    llama.generate(prompt(2), max_new_tokens=2, do_sample=False)


def test_progress_callback_exception_reaches_caller():
    def cb(done, total):
        raise Boom(f"progress {done}/{total}")
    with ThreadPoolExecutor(1) as ex:
        with pytest.raises(Boom, match="progress"):
            ex.submit(load, "llama", progress_callback=cb).result(timeout=60)


def test_callback_calling_models_does_not_deadlock():
    """A streamer that calls forward / generate on the same and on another CPU model (today: the
    same model waits for its own lock forever), also from a worker thread, and a load progress
    callback calling another model."""
    r = run_py("""
        import threading, numpy as np, fastload
        from concurrent.futures import ThreadPoolExecutor
        from golden_util import model_dir
        def load(n, **kw):
            return fastload.AutoModelForCausalLM.from_pretrained(str(model_dir(n)), device_map="cpu", torch_dtype="float32", **kw)
        a, b = load("llama"), load("qwen2")
        x = np.array([[5, 6, 7, 8]])
        ref_a, ref_b = a(x).logits, b(x).logits
        ref_g = b.generate(x, max_new_tokens=3, do_sample=False)
        class S:
            n = 0
            def put(self, v):
                self.n += 1
                assert np.array_equal(a(x).logits, ref_a)
                assert np.array_equal(b(x).logits, ref_b)
                assert np.array_equal(b.generate(x, max_new_tokens=3, do_sample=False), ref_g)
                assert np.array_equal(a.generate(x, max_new_tokens=3, do_sample=False), a.generate(x, max_new_tokens=3, do_sample=False))
            def end(self): pass
        want = a.generate(x, max_new_tokens=5, do_sample=False)
        s = S()
        assert np.array_equal(a.generate(x, max_new_tokens=5, do_sample=False, streamer=s), want)
        with ThreadPoolExecutor(2) as ex:
            assert np.array_equal(ex.submit(a.generate, x, max_new_tokens=5, do_sample=False, streamer=S()).result(), want)
        calls = []
        def progress(done, total):
            calls.append(1)
            assert np.array_equal(b(x).logits, ref_b)
        c = load("llama", progress_callback=progress)
        assert calls and np.array_equal(c(x).logits, ref_a)
        print("OK", s.n)
    """, timeout=120)
    assert r.returncode == 0 and "OK 6" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------ Ctrl-C, fork, exit
@pytest.mark.parametrize("call", ["generate", "generate_thread_waits", "forward"])
def test_sigint_stops_a_long_cpu_call(demo_gguf, call):
    """SIGINT while the main thread waits for a long CPU generate / forward: KeyboardInterrupt, and
    the model works afterwards. Without Ctrl-C handling the child runs on past the timeout."""
    r = run_py(f"""
        import os, signal, sys, threading, numpy as np, fastload
        m = fastload.AutoModelForCausalLM.from_pretrained({demo_gguf!r}, device_map="cpu")
        x = np.arange(3, 35)[None]
        m.generate(x, max_new_tokens=2, do_sample=False)
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            if {call!r} == "forward":
                big = np.tile(np.arange(3, 1027), (4, 1))
                for _ in range(1000):
                    m(big)
            elif {call!r} == "generate":
                m.generate(x, max_new_tokens=4000, min_new_tokens=4000, do_sample=False)
            else:  # another thread generates while the main thread waits for it: not the core's business
                th = threading.Thread(target=m.generate, args=(x,), kwargs=dict(max_new_tokens=20, do_sample=False))
                th.start()
                m.generate(x, max_new_tokens=4000, min_new_tokens=4000, do_sample=False)
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
        print(m.generate(x, max_new_tokens=2, do_sample=False).shape)
    """, timeout=90)
    assert r.returncode == 0 and "KeyboardInterrupt" in r.stdout and "(1, 34)" in r.stdout, r.stdout + r.stderr


def test_fork_child_can_generate():
    r = run_py("""
        import os, signal, time, numpy as np, fastload
        from golden_util import model_dir
        m = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), device_map="cpu", torch_dtype="float32", threads=2)
        x = np.array([[5, 6, 7, 8]])
        want = m.generate(x, max_new_tokens=6, do_sample=False)
        pid = os.fork()
        if pid == 0:
            ok = np.array_equal(m.generate(x, max_new_tokens=6, do_sample=False), want) and m(x).logits.shape == (1, 4, 512)
            os._exit(0 if ok else 3)
        for _ in range(900):  # 45 s, then the hung child is killed (none is left behind)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise SystemExit("the forked child hung")
        print("child", os.waitstatus_to_exitcode(status))
        assert np.array_equal(m.generate(x, max_new_tokens=6, do_sample=False), want)
    """, timeout=90)
    assert r.returncode == 0 and "child 0" in r.stdout, r.stdout + r.stderr


def test_fork_from_inside_generate_child_gets_an_error_not_a_hang(demo_gguf):
    """fork() from a streamer's put() while generate runs: in the child that generate's request stays the parent's,
    so it ends with an error naming the fork (it hung: the request was only marked cancelled and no driver runs in
    the child, hunt20), and the child can generate anew; the parent's generate finishes as alone. The demo model, so
    that the request is still running at the first put() (with a tiny fixture the driver had often made every token
    by then, and the child's generate rightly returned them: the case this test is for did not happen)."""
    r = run_py(f"""
        import os, signal, time, numpy as np, fastload
        m = fastload.AutoModelForCausalLM.from_pretrained({demo_gguf!r}, device_map="cpu")
        x = np.array([[5, 6, 7, 8]])
        kw = dict(max_new_tokens=120, do_sample=False, eos_token_id=[])
        want = m.generate(x, **kw)
        class Forker:
            pid = None
            def put(self, v):
                if self.pid is None and np.asarray(v).size == 1:  # the first generated token (the prompt comes first)
                    self.pid = os.fork()
                    if self.pid == 0:
                        signal.alarm(40)  # a hang ends the child (exit by SIGALRM), the test then fails
            def end(self):
                pass
        f = Forker()
        try:
            out = m.generate(x, streamer=f, **kw)
            how = "returned" if np.array_equal(out, want) else "wrong"
        except Exception as e:
            if f.pid != 0:
                raise
            how = "forked-error" if "forked" in str(e) else "other-error: " + str(e)
        if f.pid == 0:
            again = np.array_equal(m.generate(x, **kw), want)
            print("child took:", how, flush=True)
            os._exit(0 if again and how in ("returned", "forked-error") else 3 if again else 4)
        _, status = os.waitpid(f.pid, 0)
        print("child", os.waitstatus_to_exitcode(status), "parent", how)
    """, timeout=90)
    assert r.returncode == 0 and "child took: forked-error" in r.stdout and "child 0 parent returned" in r.stdout, \
        r.stdout + r.stderr


@pytest.mark.parametrize("streamer", [False, True])
def test_exit_with_a_job_in_flight_from_a_daemon_thread(demo_gguf, streamer):
    r = run_py(f"""
        import threading, time, numpy as np, fastload
        m = fastload.AutoModelForCausalLM.from_pretrained({demo_gguf!r}, device_map="cpu")
        x = np.arange(3, 35)[None]
        class S:
            def put(self, v): pass
            def end(self): pass
        started = threading.Event()
        def run():
            started.set()
            m.generate(x, max_new_tokens=4000, min_new_tokens=4000, do_sample=False, streamer=S() if {streamer} else None)
        threading.Thread(target=run, daemon=True).start()
        started.wait()
        time.sleep(0.5)
        print("bye", flush=True)
    """, timeout=60)
    assert r.returncode == 0 and "bye" in r.stdout, r.stdout + r.stderr
