"""The code_exec reward and its sandbox: passing code scores 1, failing code the failure score with a
reason, and an attack suite (fork bomb, endless loop, memory hog, reading and writing outside the
sandbox, TCP and unix-socket connections to servers this test runs, huge output, killing the parent,
and the kernel surface the seccomp filter closes: memfd, nested namespaces with netlink/packet/raw
sockets, io_uring, keyrings, bpf, ptrace, perf events, mount) run through RewardRunner (isolated and
not) and a Ray RewardWorker: each attack gets the failure score and its reason, leaves nothing behind,
and the worker scores the next sample correctly. The sandbox never holds host uid 0."""
import glob
import json
import os
import platform
import sys
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from miles_ray.rewards import RewardRunner
from miles_ray.rewards.code_exec import extract_code, parse_cases
from miles_ray.errors import UserValueError
from miles_ray.rewards import seccomp
from miles_ray.rewards.code_exec import code_exec_factory
from miles_ray.rewards.sandbox import SandboxLimits, protections, run_sandboxed, sweep_stale
from miles_ray.rewards.sandbox_launcher import PYTHON

LIMITS = {"cpu_s": 1.0, "wall_s": 3.0, "memory_mb": 256, "output_kb": 16, "max_processes": 16}
FAIL = -1.0
OPTIONS = {"sandbox": LIMITS, "failure_score": FAIL, "timeout_s": 30.0}
GOOD = ("", "```python\ndef add(a, b):\n    return a + b\n```", "assert add(2, 3) == 5\nassert add(-1, 1) == 0")
PROT = protections()


def test_protections_reported():
    print("\nsandbox protections:", json.dumps(PROT, indent=1))
    for key in ("user_namespace", "network_namespace", "pid_namespace", "private_root", "landlock_abi",
                "landlock_filesystem", "process_limit", "no_new_privs", "seccomp", "host_uid"):
        assert key in PROT
    assert PROT["host_uid"] != 0 and PROT["seccomp"] is True, PROT  # required by default: no filter, no run
    if PROT["landlock_abi"] < 1 and not PROT["private_root"]:
        assert any("Landlock" in w for w in PROT["warnings"])


@pytest.mark.parametrize("response,label,reason", [
    (GOOD[1], GOOD[2], None),
    ("def add(a, b):\n    return a + b", GOOD[2], None),  # no fence: the whole response is the code
    ("```python\ndef add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(add(int(input()), 1))\n```",
     GOOD[2], None),  # a main block (reading stdin) does not run under asserts
    ("```python\ndef add(a, b):\n    return a - b\n```", GOOD[2], "failed"),
    ("```python\ndef add(a, b) return\n```", GOOD[2], "syntax"),
    ("", GOOD[2], "no_code"),
    ("```python\nimport os\nos._exit(0)\n```", GOOD[2], "failed"),  # exiting before the tests is no pass
    ("```python\nimport sys\nsys.exit(0)\n```", GOOD[2], "failed"),
    ("```python\nprint(sum(map(int, input().split())))\n```",
     json.dumps([{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4", "output": "6"}]), None),
    (GOOD[1], "[1, 2]", "bad_label"),  # test code that checks nothing would pass anything
    (GOOD[1], "", "bad_label"),
    ("```python\nprint(int(input()) * 2)\n```", json.dumps([{"input": "2", "output": "4"}, {"input": "3", "output": "7"}]),
     "wrong_answer"),
])
def test_scores(response, label, reason):
    runner = RewardRunner("code_exec", timeout_s=30.0, failure_score=FAIL, isolate=False, options=OPTIONS)
    scores, stats = runner.score([("", response, label)])
    assert scores == [1.0 if reason is None else FAIL]
    assert dict(stats.reasons) == ({} if reason is None else {reason: 1})


def test_extract_code_and_label_forms():
    assert extract_code("text\n```python\nx = 1\n```\nmore\n```py\ny = 2\n```") == "y = 2"
    assert extract_code("x = 3") == "x = 3"
    assert parse_cases('[{"input": "1", "output": "2"}]') == [("1", "2")]
    assert parse_cases("[{'input': '1', 'output': '2'}]") == [("1", "2")]  # str() of a jsonl list
    assert parse_cases("assert f(1) == 2") is None and parse_cases("[1, 2]") is None


def test_sandbox_result_and_timing():
    """A run's result fields; the time per sandboxed run is printed (the measurement in the report)."""
    limits = SandboxLimits(**LIMITS)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        result = run_sandboxed("import sys\nprint(input()[::-1]); print('e', file=sys.stderr)", limits, stdin="abc\n")
        times.append(time.perf_counter() - t0)
        assert (result.ok, result.returncode, result.stdout, result.stderr, result.reason) == (True, 0, "cba\n",
                                                                                            "e\n", None)
    print(f"\nsandboxed run: median {sorted(times)[2] * 1000:.0f} ms, min {min(times) * 1000:.0f} ms")
    assert run_sandboxed("raise SystemExit(3)", limits).returncode == 3


# -- the attack suite --------------------------------------------------------------------------------
class Servers:
    """A TCP server on 127.0.0.1 and a unix-socket server in tmp_path that count connections."""

    def __init__(self, tmp_path):
        self.connections = 0
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.unix_path = str(tmp_path / "s.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        self.unix.listen()
        for sock in (self.tcp, self.unix):
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock):
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.tcp.close()
        self.unix.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("attacks")
    (tmp_path / "secret.txt").write_text("TOPSECRET")
    servers = Servers(tmp_path)
    yield tmp_path, servers
    servers.close()


NR = {"x86_64": {"add_key": 248, "bpf": 321, "ptrace": 101, "perf_event_open": 298, "clone": 56},
      "aarch64": {"add_key": 217, "bpf": 280, "ptrace": 117, "perf_event_open": 241, "clone": 220}}.get(platform.machine(), {})
LIBC = ("import ctypes, os, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "def sys_(*a):\n    return libc.syscall(*[ctypes.c_long(x) if isinstance(x, int) else x for x in a])\n"
        f"NR = {NR!r}\n")
CHILD_EXITS = "    if pid == 0:\n        os._exit(0)\n"


def kernel_attacks() -> dict:
    """name -> (code, label): what the seccomp filter closes. The label passes only if the attack worked."""
    return {
        "memfd_hog": ("fds = [os.memfd_create('hog') for _ in range(4)]\nfor fd in fds:\n    for _ in range(72):\n"
                      "        os.write(fd, b'x' * (1 << 20))",  # 4 x 72 MB: each file under RLIMIT_FSIZE
                      "assert sum(os.fstat(fd).st_size for fd in fds) >= 288 << 20"),  # LIMITS memory_mb is 256
        "nested_namespaces": ("assert libc.unshare(0x10000000 | 0x40000000) == 0, ctypes.get_errno()\n"
                              "socks = [socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12),\n"
                              "         socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0),\n"
                              "         socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)]", "assert len(socks) == 3"),
        "clone_namespaces": ("pids = []\nfor pid in (sys_(NR['clone'], 0x10000000 | 17, 0, 0, 0, 0),\n"
                             "            sys_(435, ctypes.create_string_buffer((0x10000000).to_bytes(8, 'little') + bytes(24)"
                             " + (17).to_bytes(8, 'little') + bytes(24)), 64)):\n" + CHILD_EXITS +
                             "    pids.append(pid)", "assert max(pids) > 0"),
        "sockets": ("opened = []\nfor args in ((16, 3, 0), (16, 2, 12), (17, 3, 0), (2, 3, 1), (10, 3, 58), (38, 5, 0)):\n"
                    "    try:\n        opened.append(socket.socket(*args))\n    except OSError:\n        pass",
                    "assert opened"),
        "io_uring": ("fd = sys_(425, 8, ctypes.create_string_buffer(120))", "assert fd >= 0"),
        "add_key": ("key = sys_(NR['add_key'], b'user', b'k', b'v', 1, -2)", "assert key >= 0"),
        "bpf": ("attr = ctypes.create_string_buffer((2).to_bytes(4, 'little') + (4).to_bytes(4, 'little') * 2"
                " + (1).to_bytes(4, 'little') + bytes(56))\nfd = sys_(NR['bpf'], 0, attr, 72)", "assert fd >= 0"),
        "ptrace": ("pid = os.fork()\nif pid == 0:\n    import time\n    time.sleep(5)\n    os._exit(0)\n"
                   "ret = sys_(NR['ptrace'], 16, pid, 0, 0)\nos.kill(pid, 9)", "assert ret == 0"),
        "perf_event": ("attr = bytearray(112)\nattr[0:4] = (1).to_bytes(4, 'little')\nattr[4:8] = (112).to_bytes(4, 'little')\n"
                       "attr[8:16] = (1).to_bytes(8, 'little')\nattr[40:48] = (1 | 32 | 64).to_bytes(8, 'little')\n"
                       "fd = sys_(NR['perf_event_open'], ctypes.create_string_buffer(bytes(attr)), 0, -1, -1, 0)",
                       "assert fd >= 0"),
        "mount": ("libc.unshare(0x10000000 | 0x20000)\nret = libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)",
                  "assert ret == 0"),
    }


def attacks(tmp_path, servers):
    """name -> (code, label, expected reasons, check after the run). A label passes only if the attack
    worked, so a working attack would score 1.0."""
    secret, outside = tmp_path / "secret.txt", tmp_path / "pwned.txt"
    tmp_outside = os.path.join(tempfile.gettempdir(), f"pwned_{os.getpid()}.txt")
    connected = "ok = False\n" + "\n".join(
        f"try:\n    s = socket.socket({family}); s.settimeout(1); s.connect({addr}); ok = True\nexcept OSError:\n    pass"
        for family, addr in (("socket.AF_INET", ("127.0.0.1", servers.port)), ("socket.AF_UNIX", repr(servers.unix_path))))
    no_files = lambda: not outside.exists() and not os.path.exists(tmp_outside)  # noqa: E731
    no_connections = lambda: servers.connections == 0  # noqa: E731
    return {
        "fork_bomb": ("import os\nwhile True:\n    os.fork()", "assert False", {"processes"}, None),
        "fork_bomb_catching": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                               "assert False", {"cpu", "timeout"}, None),
        "endless_loop": ("while True:\n    pass", "assert False", {"cpu", "timeout"}, None),
        "memory_hog": ("hog = []\nwhile True:\n    hog.append(bytearray(1 << 20))", "assert False", {"memory"}, None),
        "read_test_file": (f"data = open({str(secret)!r}).read()", "assert data == 'TOPSECRET'", {"failed"}, None),
        "read_passwd": ("data = open('/etc/passwd').read()", "assert 'root' in data", {"failed"}, None),
        "write_outside": (f"for p in ({str(outside)!r}, {tmp_outside!r}):\n    open(p, 'w').write('x')", "assert True",
                          {"failed"}, no_files),
        "connect": (f"import socket\n{connected}", "assert ok", {"failed"}, no_connections),
        "huge_output": ("print('x' * 10**7)", "assert False", {"output"}, None),
        "stderr_flood": ("import sys\nwhile True:\n    sys.stderr.write('y' * 65536)", "assert False", {"output"}, None),
        "kill_parent": ("import os\nos.kill(os.getppid(), 9)\nok = True", "assert ok and False", {"failed"}, None),
        "killpg_own_group": ("import os\nos.killpg(os.getpgrp(), 9)", "assert True", {"killed"}, None),
        "killpg_zero": ("import os, signal\nos.killpg(0, signal.SIGKILL)", "assert True", {"killed"}, None),
        "kill_everyone": ("import os\nos.kill(-1, 9)", "assert False", {"failed"}, None),
        **{name: (LIBC + code, label, {"failed"}, None) for name, (code, label) in kernel_attacks().items()},
    }


LAYERS = {"fork_bomb": ("process_limit",), "fork_bomb_catching": ("process_limit",),
          "read_test_file": ("private_root", "landlock_filesystem"), "read_passwd": ("private_root", "landlock_filesystem"),
          "write_outside": ("private_root", "landlock_filesystem"), "connect": ("network_namespace",),
          "kill_everyone": ("pid_namespace",), **{name: ("seccomp",) for name in kernel_attacks()}}
NAMES = [
    "fork_bomb", "fork_bomb_catching", "endless_loop", "memory_hog", "read_test_file", "read_passwd", "write_outside",
    "connect", "huge_output", "stderr_flood", "kill_parent", "killpg_own_group", "killpg_zero", "kill_everyone",
    *kernel_attacks()]


def sandbox_processes() -> list:
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            cmd = Path(path).read_bytes()
        except OSError:
            continue
        if b"/tmp/main.py" in cmd or b"miles_sandbox_" in cmd or b"sandbox_launcher.py" in cmd:
            found.append(f"{path}: {cmd[:120]!r}")
    return found


def leftovers() -> list:
    """Sandbox folders, cgroups and processes still around after a run (there must be none)."""
    found = glob.glob(os.path.join(tempfile.gettempdir(), "miles_sandbox_*"))
    found += glob.glob("/sys/fs/cgroup/pids/miles_sandbox_*") + glob.glob("/sys/fs/cgroup/miles_sandbox_*")
    return found + sandbox_processes()


@pytest.fixture(scope="module", params=[False, True], ids=["in_process", "isolated"])
def runner(request):
    r = RewardRunner("code_exec", timeout_s=30.0, failure_score=FAIL, isolate=request.param, options=OPTIONS)
    yield r
    r.close()


@pytest.mark.parametrize("name", NAMES)
def test_attack(name, runner, env):
    if name in LAYERS and not any(PROT.get(layer) for layer in LAYERS[name]):
        pytest.skip(f"{name}: none of {LAYERS[name]} available here")
    code, label, reasons, check = attacks(*env)[name]
    scores, stats = runner.score([("", f"```python\n{code}\n```", label), GOOD])
    assert scores == [FAIL, 1.0], (name, stats.messages)
    assert sum(stats.reasons.values()) == 1 and set(stats.reasons) <= reasons, (name, dict(stats.reasons))
    assert check is None or check(), name
    assert leftovers() == []


def test_reward_timeout_kills_the_sandbox_and_leftovers_are_swept():
    """reward.timeout_s below wall_s: the runner kills its isolated worker mid-run; the sandbox dies
    with it (PDEATHSIG chain, pid namespace) and its folder and cgroup are removed by the next
    process that runs a sandbox (owner pid gone)."""
    options = dict(OPTIONS, sandbox=dict(LIMITS, cpu_s=30.0, wall_s=30.0))
    runner = RewardRunner("code_exec", timeout_s=6.0, failure_score=FAIL, isolate=True, options=options)
    try:
        scores, stats = runner.score([("", "```python\nwhile True:\n    pass\n```", "assert False")])
    finally:
        runner.close()
    assert scores == [FAIL] and stats.timeouts == 1
    deadline = time.time() + 5
    while sandbox_processes() and time.time() < deadline:
        time.sleep(0.1)
    assert sandbox_processes() == []
    stale = len(leftovers())
    assert stale >= 1 and sweep_stale() == stale and leftovers() == []  # the folder (and cgroup, as root)


@pytest.mark.parametrize("off,flag", [("namespaces", "network_namespace"), ("private_root", "private_root"),
                                      ("landlock", "landlock_filesystem")])
def test_each_layer_alone_blocks_files_and_tcp(off, flag, env):
    """With one layer switched off the others still stop the file and TCP attacks, and the missing
    layer is reported with a warning, not claimed. (A pathname unix socket is stopped by the private
    root only: Landlock does not cover connect(); docs/sandbox.md.)"""
    tmp_path, servers = env
    table = attacks(tmp_path, servers)
    alive = run_sandboxed("print('alive')", LIMITS, layers_off=(off,))
    if os.geteuid() == 0 and "could not start the code" in alive.stderr and off != "landlock":
        pytest.skip(f"as root without a private root the code runs as host uid {SandboxLimits().host_uid}, which cannot "
                    f"reach this interpreter ({PYTHON}): {alive.stderr.strip()[-200:]}")
    assert alive.ok and alive.stdout == "alive\n", alive  # so the attacks below fail for the layers, not at start
    tcp = f"import socket\nsocket.create_connection(('127.0.0.1', {servers.port}), timeout=1)"
    for code in [table[name][0] for name in ("read_test_file", "read_passwd", "write_outside")] + [tcp]:
        result = run_sandboxed(code, LIMITS, layers_off=(off,))
        assert result.reason == "failed" and ("Error" in result.stderr), (off, code, result)
    assert table["write_outside"][3]() and servers.connections == 0
    assert result.protections[flag] is False and result.protections["warnings"], result.protections
    assert leftovers() == []


def test_attacks_through_a_ray_reward_worker(local_ray, env):
    """A RewardWorker actor that runs the sandbox in its own process (isolate=False: the actor is the
    sandbox's parent) survives the parent-killing and fork-bomb attacks and keeps its pid."""
    import ray
    from actors.reward import RewardWorker
    from miles_ray.sample import Sample

    worker = RewardWorker.remote("code_exec", 30.0, FAIL, False, OPTIONS)
    pid = ray.get(worker.where.remote())["pid"]
    table = attacks(*env)
    names = ["kill_parent", "killpg_zero", "kill_everyone", "fork_bomb", "connect", "memfd_hog", "nested_namespaces"]
    rows = [(f"```python\n{table[n][0]}\n```", table[n][1]) for n in names] + [GOOD[1:]]
    samples = [Sample(i, i, "", label, [], response_text=text) for i, (text, label) in enumerate(rows)]
    scored, stats = ray.get(worker.score.remote(samples), timeout=120)
    assert [s.reward for s in scored] == [FAIL] * len(names) + [1.0]
    assert sum(stats["reasons"].values()) == len(names)
    again, _ = ray.get(worker.score.remote([Sample(9, 9, "", GOOD[2], [], response_text=GOOD[1])]), timeout=60)
    assert again[0].reward == 1.0
    assert ray.get(worker.where.remote())["pid"] == pid
    assert env[1].connections == 0 and leftovers() == []
    ray.kill(worker)


def test_without_the_filter_the_kernel_attacks_work():
    """The same programs with the seccomp layer switched off (and not required): the ones the kernel allows an
    unprivileged user do succeed, so it is the filter that stops them in test_attack."""
    limits = dict(LIMITS, require_seccomp=False, wall_s=15.0)
    worked = {}
    for name, (code, label) in kernel_attacks().items():
        result = run_sandboxed(f"{LIBC}{code}\n{label}\n", limits, layers_off=("seccomp",))
        worked[name] = result.ok
        warnings = result.protections.get("warnings", [])
        assert result.protections.get("seccomp") is False and any("seccomp" in w for w in warnings), (name, result)
    print("\nwithout the seccomp filter these attacks worked:", sorted(n for n, ok in worked.items() if ok))
    assert worked["memfd_hog"] and worked["nested_namespaces"] and worked["sockets"] and worked["add_key"], worked
    if _read("/proc/sys/kernel/io_uring_disabled", "0") == "0":
        assert worked["io_uring"], worked


def _read(path: str, default: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def test_no_filter_is_refused_unless_allowed(monkeypatch):
    """No libseccomp binding: the sandbox refuses (sandbox_error) and code_exec does not build, unless
    reward.sandbox.require_seccomp is false (then it runs, warned, with no filter)."""
    seccomp.clear_cache()
    monkeypatch.setitem(sys.modules, "pyseccomp", None)  # import pyseccomp -> ImportError
    try:
        refused = run_sandboxed("print(1)", LIMITS)
        assert refused.reason == "sandbox_error" and "require_seccomp" in refused.stderr, refused
        with pytest.raises(UserValueError, match="require_seccomp"):
            code_exec_factory(OPTIONS)
        allowed = run_sandboxed("print(1)", dict(LIMITS, require_seccomp=False))
        assert allowed.ok and allowed.stdout == "1\n" and allowed.protections["seccomp"] is False
        assert any("no seccomp filter" in w for w in allowed.protections["warnings"])
    finally:
        seccomp.clear_cache()


def _code_process_ids(found: dict) -> None:
    """The host's view (/proc/PID/status) of the sandboxed program's uid, gid and groups."""
    deadline = time.time() + 15
    while time.time() < deadline and not found:
        for path in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                if b"/tmp/main.py" in Path(path).read_bytes():
                    status = Path(path).with_name("status").read_text()
                    found.update(line.split(":", 1) for line in status.splitlines()
                                 if line.startswith(("Uid:", "Gid:", "Groups:")))
                    return
            except (OSError, ValueError):
                continue
        time.sleep(0.02)


@pytest.mark.parametrize("host_uid", [None, 12345])
def test_the_sandbox_never_holds_host_uid_0(host_uid):
    """Seen from the host, the code's uid and gid are the worker's own, or (worker as root) host_uid/host_gid
    (default nobody), never 0, and it holds no supplementary groups; inside it is uid 1000."""
    if host_uid is not None and os.geteuid() != 0:
        pytest.skip("host_uid applies to a root worker only; this test runs as uid %d" % os.geteuid())
    limits = dict(LIMITS, wall_s=10.0, **({"host_uid": host_uid, "host_gid": host_uid} if host_uid else {}))
    found: dict = {}
    watcher = threading.Thread(target=_code_process_ids, args=(found,))
    watcher.start()
    result = run_sandboxed("import os, time\nprint(os.getuid(), os.getgid())\ntime.sleep(3)", limits)
    watcher.join()
    inside = "1000 1000\n" if PROT["user_namespace"] else f"{found['Uid'].split()[0]} {found['Gid'].split()[0]}\n"
    assert result.ok and result.stdout == inside, result
    want = (host_uid or 65534) if os.geteuid() == 0 else os.geteuid()
    assert found and set(found["Uid"].split()) == {str(want)}, found
    assert set(found["Gid"].split()) == {str(want if os.geteuid() == 0 else os.getegid())}, found
    assert result.protections["host_uid"] == want
    if os.geteuid() == 0:
        assert found["Groups"].split() == [], found
