"""Run untrusted Python code in a sandbox (the ``code_exec`` reward). Linux only; stdlib only, because
this file is also the sandbox's launcher script (``python -I -S sandbox.py CONFIG``).

Process chain: the caller -> *launcher* (new session, joins a pids cgroup when one can be made,
unshares user/net/pid/mount/ipc/uts namespaces) -> *init* (pid 1 of the new pid namespace: private
root, process limit, Landlock; reports the result on a status pipe) -> the *code* (``python -I -S``,
rlimits, empty environment). When init exits, the kernel kills everything left in its pid namespace.
Every layer is detected at run time; what was applied is reported (:func:`protections`) and a missing
one is logged as a warning, never claimed. docs/sandbox.md lists what is and is not enforced.

Invariants: the caller's temporary folder and cgroup are removed and the launcher's process group is
killed after every run; output beyond ``output_kb`` and time beyond ``wall_s`` kill the run.
"""
from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import platform
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

log = logging.getLogger(__name__)
PYTHON = os.path.realpath(sys.executable)  # the base interpreter, not a venv's wrapper
CODE_FLAGS = ["-I", "-S", "-B", "-X", "utf8"]  # isolated: no env vars, no site-packages, no .pyc
NS = {"user": 0x10000000, "network": 0x40000000, "pid": 0x20000000, "mount": 0x20000, "ipc": 0x08000000,
      "uts": 0x04000000}
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
LL_CREATE, LL_ADD_RULE, LL_RESTRICT = 444, 445, 446  # same numbers on every architecture
LL_READ = 1 | 4 | 8  # EXECUTE | READ_FILE | READ_DIR
LL_FILE_RIGHTS = 1 | 2 | 4 | (1 << 14) | (1 << 15)  # rights a rule on a single file may carry
READ_ONLY_PATHS = ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/ld.so.cache"]
DEVICES = ["/dev/null", "/dev/zero", "/dev/urandom"]
SANDBOX_UID = 1000  # the code's uid inside its user namespace (not 0: exec drops every capability)


@dataclass
class SandboxLimits:
    """``cfg.reward.sandbox`` (SandboxConfig)."""
    cpu_s: float = 5.0
    wall_s: float = 10.0
    memory_mb: int = 512
    output_kb: int = 64
    max_processes: int = 32

    @classmethod
    def from_options(cls, options) -> "SandboxLimits":
        if isinstance(options, cls):
            return options
        return cls(**{k: v for k, v in dict(options or {}).items() if k in cls.__dataclass_fields__})


@dataclass
class SandboxResult:
    """``reason``: None on success, else syntax, timeout, cpu, memory, output, file_size, processes,
    killed, failed (non-zero exit) or sandbox_error."""
    ok: bool
    returncode: Optional[int]
    stdout: str
    stderr: str
    reason: Optional[str] = None
    cpu_s: float = 0.0
    wall_s: float = 0.0
    protections: dict = field(default_factory=dict)


# -- the caller's side ---------------------------------------------------------------------------
def run_sandboxed(code: str, limits=None, stdin: str = "") -> SandboxResult:
    """Run ``code`` (Python source) with ``stdin`` as its input under ``limits`` (SandboxLimits or dict)."""
    limits = SandboxLimits.from_options(limits)
    try:
        compile(code, "main.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as err:
        return SandboxResult(False, None, "", f"{type(err).__name__}: {err}", "syntax")
    base, cgroup, proc = tempfile.mkdtemp(prefix="miles_sandbox_"), make_cgroup(limits.max_processes + 2), None
    try:
        os.mkdir(os.path.join(base, "work"), 0o700)
        with open(os.path.join(base, "work", "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(base, "stdin"), "w", encoding="utf-8") as f:
            f.write(stdin)
        status_r, status_w = os.pipe()
        cfg = {"base": base, "cgroup": cgroup, "status_fd": status_w, "ppid": os.getpid(), "limits": limits.__dict__}
        t0 = time.monotonic()
        proc = subprocess.Popen([PYTHON, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(cfg)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(status_w,), start_new_session=True, env={}, cwd=base)
        os.close(status_w)
        try:
            return collect(proc, status_r, limits, t0)
        finally:
            os.close(status_r)
    finally:
        if proc is not None:
            kill_group(proc)
        remove_cgroup(cgroup)
        shutil.rmtree(base, onerror=_force_remove)


def collect(proc: subprocess.Popen, status_r: int, limits: SandboxLimits, t0: float) -> SandboxResult:
    """Read output (capped) and the init's status line until both end, the wall limit or the cap."""
    out, err, status = bytearray(), bytearray(), bytearray()
    bufs = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, status_r: status}
    deadline, reason, cap = t0 + limits.wall_s, None, limits.output_kb * 1024
    while bufs:
        left = deadline - time.monotonic()
        if left <= 0:
            reason = reason or ("timeout" if status_r in bufs else None)
            break
        for fd in select.select(list(bufs), [], [], left)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                del bufs[fd]
                if fd == status_r:  # init is done: what is still running is a leftover, drained briefly
                    deadline = min(deadline, time.monotonic() + 0.2)
            elif len(bufs[fd]) < cap + (1 << 16):
                bufs[fd] += chunk
        if len(out) + len(err) > cap:
            reason = "output"
            break
    if reason:
        kill_group(proc)
    proc.wait()
    report = _parse_status(bytes(status))
    stderr = err[:cap].decode("utf-8", "replace")
    reason = reason or classify(report, limits, stderr)
    sig, code = report.get("signal"), report.get("code")
    returncode = -sig if sig else code if code is not None else proc.returncode
    return SandboxResult(reason is None, returncode, out[:cap].decode("utf-8", "replace"), stderr, reason,
                         report.get("cpu_s", 0.0), time.monotonic() - t0, report.get("protections", {}))


def _parse_status(raw: bytes) -> dict:
    try:
        return json.loads(raw.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


def classify(report: dict, limits: SandboxLimits, stderr: str) -> Optional[str]:
    """The failure reason of a finished run (None: exit code 0)."""
    if not report:
        return "killed"  # no status: the launcher or init was killed
    if "setup_error" in report:
        return "sandbox_error"
    sig, code = report.get("signal"), report.get("code")
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and report.get("cpu_s", 0) >= math.ceil(limits.cpu_s) - 0.05):
        return "cpu"
    if sig == signal.SIGXFSZ:
        return "file_size"
    tail = stderr[-2000:]
    if code == 0 and not sig:
        return None
    if "MemoryError" in tail:
        return "memory"
    if "BlockingIOError: [Errno 11]" in tail:
        return "processes"
    return "killed" if sig else "failed"


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _force_remove(func, path, _exc) -> None:
    """rmtree's error handler: the code may have taken the write bit off its folders."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path, ignore_errors=True)
        else:
            func(path)
    except OSError as err:
        log.warning("sandbox: could not remove %s: %s", path, err)


def make_cgroup(max_pids: int) -> Optional[str]:
    """A pids cgroup (v1 ``pids`` hierarchy, or the v2 root with the pids controller) when this process
    may create one (usually root); None otherwise (then RLIMIT_NPROC is the process limit)."""
    if os.geteuid() != 0:
        return None
    for root in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        control = os.path.join(root, "cgroup.subtree_control")
        if not os.path.isfile(os.path.join(root, "cgroup.procs")) or (
                os.path.exists(control) and "pids" not in open(control).read().split()):
            continue
        path = os.path.join(root, f"miles_sandbox_{uuid.uuid4().hex[:12]}")
        try:
            os.mkdir(path)
            with open(os.path.join(path, "pids.max"), "w") as f:
                f.write(str(max_pids))
            return path
        except OSError:
            remove_cgroup(path if os.path.isdir(path) else None)
    return None


def remove_cgroup(path: Optional[str]) -> None:
    """Kill whatever is left in the cgroup, then remove it."""
    for _ in range(100) if path else ():
        try:
            pids = open(os.path.join(path, "cgroup.procs")).read().split()
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            os.rmdir(path)
            return
        except (OSError, ValueError):
            time.sleep(0.01)
    if path and os.path.isdir(path):
        log.warning("sandbox: cgroup %s could not be removed", path)


_PROTECTIONS: dict = {}


def protections() -> dict:
    """What the sandbox enforces on this machine, from a probe run (cached); missing layers are logged."""
    if not _PROTECTIONS:
        result = run_sandboxed("pass", SandboxLimits(wall_s=30.0))
        _PROTECTIONS.update(result.protections or {"error": result.stderr[-500:] or result.reason})
        for warning in _PROTECTIONS.get("warnings", []) + ([] if result.ok else [f"probe failed: {result.reason}"]):
            log.warning("sandbox: %s", warning)
    return dict(_PROTECTIONS)


# -- the launcher and init (run as ``python -I -S sandbox.py CONFIG``) ------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def _call(ret: int, what: str) -> int:
    if ret < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return ret


def _prctl(option: int, value: int) -> None:
    _call(_libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
          "prctl")


def _mount(src, dst, fstype, flags, data=None) -> None:
    enc = [None if s is None else s.encode() for s in (src, dst, fstype, data)]
    _call(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {dst}")


def launcher(cfg: dict) -> None:
    """Joins the cgroup, unshares the namespaces, forks init and waits for it."""
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the caller
    if os.getppid() != cfg["ppid"]:
        os._exit(70)
    report = {"warnings": [], "process_limit": None}
    if cfg["cgroup"]:
        with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        report["process_limit"] = "cgroup_pids"
    flags = sum(NS.values())
    go_r, go_w = os.pipe()
    mapper = os.fork()
    if mapper == 0:  # stays in this namespace: mapping uid 0 needs CAP_SETFCAP here (verify_root_map)
        os.close(go_w)
        os._exit(0 if os.read(go_r, 1) == b"1" and write_id_maps(os.getppid()) else 1)
    os.close(go_r)
    try:
        _call(_libc.unshare(flags), "unshare")
        os.write(go_w, b"1")
        if os.waitstatus_to_exitcode(os.waitpid(mapper, 0)[1]) != 0:
            raise OSError("could not write the uid/gid maps")
    except OSError as err:
        flags = 0
        report["warnings"].append(f"no namespaces (user, network, pid, mount, ipc, uts): {err}")
    finally:
        os.close(go_w)
    report.update({f"{name}_namespace": bool(flags & bit) for name, bit in NS.items()})
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        init(cfg, report, alive_r)
    os.close(alive_r)
    os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) & 0x7F)


def write_id_maps(pid: int) -> bool:
    """Map SANDBOX_UID/GID inside ``pid``'s new user namespace to this process's uid/gid."""
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{SANDBOX_UID} {os.geteuid()} 1"),
                           ("gid_map", f"{SANDBOX_UID} {os.getegid()} 1")):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(text)
        return True
    except OSError as err:
        os.write(2, f"sandbox: {err}\n".encode())
        return False


def init(cfg: dict, report: dict, alive_r: int) -> None:
    """Pid 1 of the sandbox: sets up, runs the code, reports its status and rusage, exits."""
    _prctl(1, signal.SIGKILL)
    if select.select([alive_r], [], [], 0)[0]:
        os._exit(71)  # the launcher died before PDEATHSIG was armed
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)
    try:
        run = setup(cfg, report)
    except Exception as err:  # noqa: BLE001 - reported to the caller as sandbox_error
        os.write(status_fd, json.dumps({"setup_error": f"{type(err).__name__}: {err}"}).encode() + b"\n")
        os._exit(72)
    pid = os.fork()
    if pid == 0:
        exec_code(cfg["limits"], *run)
    _, status, usage = os.wait4(pid, 0)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    reply = {"signal": sig, "code": None if sig else os.WEXITSTATUS(status), "protections": report,
             "cpu_s": round(usage.ru_utime + usage.ru_stime, 4), "maxrss_kb": usage.ru_maxrss}
    os.write(status_fd, json.dumps(reply).encode() + b"\n")
    os._exit(0)


def setup(cfg: dict, report: dict) -> tuple:
    """Private root (or the plain work folder), the process limit and Landlock, in that order."""
    limits, base = cfg["limits"], cfg["base"]
    stdin_fd = os.open(os.path.join(base, "stdin"), os.O_RDONLY)
    workdir, report["private_root"] = os.path.join(base, "work"), False
    if report["mount_namespace"]:
        try:
            workdir = private_root(base, limits["memory_mb"])
            report["private_root"] = True
        except OSError as err:
            report["warnings"].append(f"no private root, the code sees this machine's files (Landlock only): {err}")
    nproc = limits["max_processes"] + 2  # + launcher and init, which share the count
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    if report["process_limit"] is None:
        if os.geteuid() == 0 and not report["user_namespace"]:
            report["warnings"].append("no process limit: RLIMIT_NPROC does not apply to root and no pids cgroup")
        else:  # counted per user namespace: each sandbox has its own budget
            report["process_limit"] = "rlimit_nproc"
    report.update(landlock(read_only_paths(), [workdir], DEVICES, report))
    _prctl(4, 0)  # PR_SET_DUMPABLE 0: the code cannot ptrace init
    return workdir, stdin_fd


def read_only_paths() -> list[str]:
    """The interpreter's installation and the shared libraries it loads."""
    paths = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(PYTHON)}
    for p in READ_ONLY_PATHS:
        if os.path.exists(p):
            paths.add(p)
            paths.add(os.path.realpath(p))
    return sorted(paths)


def private_root(base: str, size_mb: int) -> str:
    """A tmpfs of ``size_mb`` as the new root holding read-only binds of the interpreter and libraries,
    the devices in DEVICES and a writable /tmp with the code; pivot_root into it. Returns the workdir."""
    root = os.path.join(base, "root")
    os.mkdir(root)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,mode=0755")
    for path in read_only_paths() + DEVICES:
        dst = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.readlink(path), dst)
            continue
        if os.path.exists(dst):
            continue
        if os.path.isdir(path):
            os.makedirs(dst)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "w").close()
        _mount(path, dst, None, MS_BIND | MS_REC)
        if path not in DEVICES:
            _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NODEV | _locked_flags(path))
    os.mkdir(root + "/tmp", 0o700)
    shutil.copyfile(os.path.join(base, "work", "main.py"), root + "/tmp/main.py")
    os.chdir(root)
    number = PIVOT_ROOT.get(platform.machine())
    if number is None:
        os.chroot(".")
    else:
        _call(_libc.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")
        _call(_libc.umount2(b".", 2), "umount old root")  # MNT_DETACH
    os.chdir("/")
    return "/tmp"


def _locked_flags(path: str) -> int:
    """Mount flags a remount inside a user namespace must keep (nosuid, noexec, atime flags)."""
    have = os.statvfs(path).f_flag
    pairs = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NOEXEC, 8), (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048),
             (os.ST_RELATIME, 1 << 21))
    return MS_NOSUID | sum(ms for st, ms in pairs if have & st)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]


def landlock_abi() -> int:
    return max(_libc.syscall(ctypes.c_long(LL_CREATE), None, ctypes.c_long(0), ctypes.c_long(1)), 0)


def landlock(read: list, write: list, devices: list, report: dict) -> dict:
    """Restrict this process and its children: read/execute ``read``, everything under ``write``,
    read/write ``devices``; no TCP bind/connect (ABI >= 4); no signals or abstract unix sockets
    outside the sandbox (ABI >= 6). Also sets no_new_privs."""
    abi = landlock_abi()
    _prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
    done = {"landlock_abi": abi, "no_new_privs": True, "landlock_filesystem": abi >= 1,
            "landlock_network": abi >= 4, "landlock_signal_scope": abi >= 6}
    if abi < 1:
        report["warnings"].append("no Landlock: file access is limited by the private root only")
        return done
    fs = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1
    attr = _RulesetAttr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    ruleset = _call(_libc.syscall(ctypes.c_long(LL_CREATE), ctypes.byref(attr),
                                  ctypes.c_long(8 if abi < 4 else 16 if abi < 6 else 24), ctypes.c_long(0)),
                    "landlock_create_ruleset")
    try:
        for paths, access in ((read, LL_READ), (write, fs), (devices, 2 | 4 | (1 << 14) | (1 << 15))):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                allowed = access & fs & (fs if stat.S_ISDIR(os.fstat(fd).st_mode) else LL_FILE_RIGHTS)
                rule = _PathBeneath(allowed, fd)
                ret = _libc.syscall(ctypes.c_long(LL_ADD_RULE), ctypes.c_long(ruleset), ctypes.c_long(1),
                                    ctypes.byref(rule), ctypes.c_long(0))
                os.close(fd)
                _call(ret, f"landlock_add_rule {path}")
        _call(_libc.syscall(ctypes.c_long(LL_RESTRICT), ctypes.c_long(ruleset), ctypes.c_long(0)),
              "landlock_restrict_self")
    finally:
        os.close(ruleset)
    if abi < 4:
        report["warnings"].append(f"Landlock ABI {abi}: no TCP or signal scoping from Landlock")
    elif abi < 6:
        report["warnings"].append(f"Landlock ABI {abi}: no signal scoping from Landlock")
    return done


def exec_code(limits: dict, workdir: str, stdin_fd: int) -> None:
    """The code's process: stdin, rlimits, empty environment, exec the interpreter."""
    try:
        _prctl(1, signal.SIGKILL)
        os.dup2(stdin_fd, 0)
        cpu = math.ceil(limits["cpu_s"])
        memory = limits["memory_mb"] << 20
        for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (memory, memory)),
                           (resource.RLIMIT_FSIZE, (memory, memory)), (resource.RLIMIT_NOFILE, (64, 64)),
                           (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(res, value)
        os.chdir(workdir)
        os.execve(PYTHON, [PYTHON, *CODE_FLAGS, os.path.join(workdir, "main.py")],
                  {"HOME": workdir, "TMPDIR": workdir, "PATH": "/usr/bin:/bin"})
    except BaseException as err:  # noqa: BLE001 - reported on the code's stderr
        os.write(2, f"sandbox: could not start the code: {type(err).__name__}: {err}\n".encode())
    finally:
        os._exit(127)


if __name__ == "__main__":
    launcher(json.loads(sys.argv[1]))
