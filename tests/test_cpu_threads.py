"""The CPU backend's thread count while other processes keep the cores busy (csrc/cpu/cpu_threads.c): with threads=0
(the default) it runs on the cores the others leave, a few times a second at the start of a forward; a count given
(threads=N, FASTLOAD_THREADS, OMP_NUM_THREADS) or FASTLOAD_ADAPT_THREADS=0 keeps it fixed. Outputs never depend on the
count. These tests start one spinning process per CPU this process may run on, so they need Linux and at most 16
CPUs (more would only make them slow)."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import fastload
from golden_util import model_dir

IDS = np.array([[3, 17, 230, 5, 99, 41]])
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "sched_getaffinity"),
                                reason="the thread count adapts on Linux only (/proc/stat)")


def _ncpu():
    return len(os.sched_getaffinity(0))


def _load(monkeypatch, **kw):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("FASTLOAD_THREADS", raising=False)
    return fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("qwen2")), device_map="cpu",
                                                         torch_dtype="float32", **kw)


def _now(m):
    return m._core.info["cpu_threads_now"], m._core.info["cpu_threads"]


def _under_load(m, seconds, stop=None):
    """Generate for up to `seconds` while one process per CPU spins; the tokens of each call, and the counts seen."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(_ncpu())]
    outs, seen = [], []
    try:
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            outs.append(m.generate(IDS, max_new_tokens=12, eos_token_id=[]))
            seen.append(_now(m)[0])
            if stop and stop(seen[-1]):
                break
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    return outs, seen


@pytest.fixture
def cpus():
    n = _ncpu()
    if n < 2 or n > 16:
        pytest.skip(f"needs 2 to 16 CPUs in this process's affinity mask, has {n}")
    return n


def test_default_count_drops_while_cores_are_busy(monkeypatch, cpus):
    monkeypatch.delenv("FASTLOAD_ADAPT_THREADS", raising=False)
    m = _load(monkeypatch)
    now, most = _now(m)
    assert most == cpus and now == most  # all of them until a forward has looked
    ref = m.generate(IDS, max_new_tokens=12, eos_token_id=[])
    outs, seen = _under_load(m, 30, stop=lambda n: n < most)
    assert min(seen) < most, f"{cpus} busy processes for 30 s and the count stayed at {most}: {seen[-5:]}"
    for o in outs:  # the same tokens at any count
        np.testing.assert_array_equal(o, ref)
    assert m.engine_stats()["cpu_threads_now"] == _now(m)[0]


@pytest.mark.parametrize("how", ["threads", "env_off", "omp"])
def test_a_chosen_count_stays(monkeypatch, cpus, how):
    monkeypatch.delenv("FASTLOAD_ADAPT_THREADS", raising=False)
    if how == "threads":
        m = _load(monkeypatch, threads=cpus)
    elif how == "env_off":
        monkeypatch.setenv("FASTLOAD_ADAPT_THREADS", "0")
        m = _load(monkeypatch)
    else:  # OMP_NUM_THREADS is read when libgomp starts: here it only says the count was chosen
        m = None
        monkeypatch.delenv("FASTLOAD_THREADS", raising=False)
        monkeypatch.setenv("OMP_NUM_THREADS", str(cpus))
        m = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("qwen2")), device_map="cpu",
                                                          torch_dtype="float32")
    _, seen = _under_load(m, 1.5)
    assert set(seen) == {cpus}


def _cpu_cgroup_dir():
    """A new cgroup with the cpu controller under this process's own (v1 cpu hierarchy, or v2 where the parent hands
    the controller down), and whether it is v2; skips where that cannot be made (not root, a read-only mount)."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, ctrls, path = line.rstrip("\n").split(":", 2)
            if hid == "0" and ctrls == "":
                own["v2"] = path
            elif "cpu" in ctrls.split(","):
                own["v1"] = path
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            root, mnt = left.split()[3:5]
            fstype, _, opts = right.split()[:3]
            kind = "v2" if fstype == "cgroup2" else "v1" if fstype == "cgroup" and "cpu" in opts.split(",") else None
            if kind is None or kind not in own or root != "/":
                continue
            base = mnt + (own[kind] if own[kind] != "/" else "")
            if kind == "v2":
                try:
                    with open(os.path.join(base, "cgroup.subtree_control")) as g:
                        if "cpu" not in g.read().split():
                            continue
                except OSError:
                    continue
            d = os.path.join(base, f"fastload-test-{os.getpid()}")
            try:
                os.mkdir(d)
            except OSError:
                continue
            return d, kind == "v2"
    pytest.skip("cannot make a cgroup with the cpu controller here (needs root and a writable cgroup mount)")


def test_a_cgroup_cpu_limit_caps_the_default_count(monkeypatch, cpus):
    d, v2 = _cpu_cgroup_dir()
    try:
        if v2:
            with open(os.path.join(d, "cpu.max"), "w") as f:
                f.write("100000 100000")
        else:
            with open(os.path.join(d, "cpu.cfs_period_us"), "w") as f:
                f.write("100000")
            with open(os.path.join(d, "cpu.cfs_quota_us"), "w") as f:
                f.write("60000")  # 0.6 of a CPU: rounded up to 1
        code = (f"import os, sys; open({os.path.join(d, 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
                "import fastload, numpy as np\n"
                f"m = fastload.AutoModelForCausalLM.from_pretrained({str(model_dir('qwen2'))!r}, device_map='cpu', "
                "torch_dtype='float32')\n"
                "a = m._core.info['cpu_threads_now']\n"
                "m.generate(np.array([[3, 17, 230]]), max_new_tokens=4, eos_token_id=[])\n"
                "print(a, m._core.info['cpu_threads_now'], m._core.info['cpu_threads'])\n")
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "FASTLOAD_THREADS",
                                                                "FASTLOAD_ADAPT_THREADS")}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        first, after, most = map(int, r.stdout.split()[-3:])
        want = 1
        assert most == cpus and first == want and after <= want, r.stdout
    finally:
        os.rmdir(d)
