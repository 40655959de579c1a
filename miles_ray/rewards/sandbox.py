"""Run untrusted Python code in a sandbox (the ``code_exec`` reward). Linux only.

Process chain: the caller -> *launcher* (:mod:`miles_ray.rewards.sandbox_launcher`, a new session;
joins a pids cgroup when this side could make one; unshares user/net/pid/mount/ipc/uts namespaces) ->
*init* (pid 1 of the new pid namespace: private root, an unprivileged host uid, process limit, Landlock,
the seccomp filter of :mod:`miles_ray.rewards.seccomp`; reports the result on a status pipe) -> the *code* (``python -I -S``, rlimits, empty environment). This side reads the output
(capped), enforces the wall-clock limit by killing the launcher's process group, and cleans up. When init exits, the kernel kills everything left in its pid namespace.
Every layer is detected at run time; what was applied is reported (:func:`protections`) and a missing
one is logged as a warning, never claimed. docs/sandbox.md lists what is and is not enforced.

Invariants: the caller's temporary folder and cgroup are removed and the launcher's process group is
killed after every run; output beyond ``output_kb`` and time beyond ``wall_s`` kill the run.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from miles_ray.rewards import sandbox_launcher
from miles_ray.rewards.sandbox_launcher import PYTHON
from miles_ray.rewards.seccomp import SeccompUnavailable, filter_program

log = logging.getLogger(__name__)
PREFIX = "miles_sandbox_"  # + owner pid + "_": temporary folders and cgroups
_SWEPT: list = []


@dataclass
class SandboxLimits:
    """``cfg.reward.sandbox`` (SandboxConfig)."""
    cpu_s: float = 5.0
    wall_s: float = 10.0
    memory_mb: int = 512
    output_kb: int = 64
    max_processes: int = 32
    require_seccomp: bool = True  # no filter -> sandbox_error (False: run unfiltered, warned)
    host_uid: int = 65534  # the sandbox's host uid/gid when the caller is root (nobody/nogroup)
    host_gid: int = 65534

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
def run_sandboxed(code: str, limits=None, stdin: str = "", layers_off: tuple = ()) -> SandboxResult:
    """Run ``code`` (Python source) with ``stdin`` as its input under ``limits`` (SandboxLimits or dict).
    ``layers_off`` (tests: each layer alone, the warnings of a missing one): namespaces, private_root,
    landlock, cgroup, seccomp."""
    limits = SandboxLimits.from_options(limits)
    try:
        compile(code, "main.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as err:
        return SandboxResult(False, None, "", f"{type(err).__name__}: {err}", "syntax")
    try:
        seccomp = seccomp_config(limits, layers_off)
    except SeccompUnavailable as err:
        return SandboxResult(False, None, "", f"sandbox: {err}", "sandbox_error")
    if not _SWEPT:
        _SWEPT.append(sweep_stale())
    base, cgroup, proc = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}_"), None, None
    try:
        cgroup = None if "cgroup" in layers_off else make_cgroup(limits.max_processes + 2)
        os.mkdir(os.path.join(base, "work"), 0o700)
        with open(os.path.join(base, "work", "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(base, "stdin"), "w", encoding="utf-8") as f:
            f.write(stdin)
        hand_over(base, limits)
        status_r, status_w = os.pipe()
        cfg = {"base": base, "cgroup": cgroup, "status_fd": status_w, "ppid": os.getpid(), "limits": limits.__dict__,
               "off": list(layers_off), "uid": os.geteuid(), **seccomp}
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen([PYTHON, "-I", "-S", "-B", os.path.abspath(sandbox_launcher.__file__),
                                     json.dumps(cfg)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(status_w,), start_new_session=True, env={}, cwd=base)
        finally:
            os.close(status_w)
        try:
            return collect(proc, status_r, limits, t0)
        finally:
            os.close(status_r)
    finally:
        if proc is not None:
            kill_group(proc)
            proc.stdout.close()
            proc.stderr.close()
        remove_cgroup(cgroup)
        shutil.rmtree(base, onerror=_force_remove)


def seccomp_config(limits: SandboxLimits, layers_off: tuple) -> dict:
    """The launcher's ``seccomp`` (hex BPF) and ``seccomp_why`` keys. Raises SeccompUnavailable when no
    filter can be built and ``limits.require_seccomp``."""
    if "seccomp" in layers_off:
        return {"seccomp": None, "seccomp_why": "switched off"}
    try:
        return {"seccomp": filter_program().hex()}
    except SeccompUnavailable as err:
        if limits.require_seccomp:
            raise SeccompUnavailable(f"no seccomp filter can be built ({err}); the sandbox refuses to run without one "
                                     "unless reward.sandbox.require_seccomp is false") from None
        return {"seccomp": None, "seccomp_why": str(err)}


def hand_over(base: str, limits: SandboxLimits) -> None:
    """As root, the run's folder and files belong to the sandbox's host uid (it is not root)."""
    if os.geteuid() != 0:
        return
    for path in (base, os.path.join(base, "work"), os.path.join(base, "work", "main.py"), os.path.join(base, "stdin")):
        os.chown(path, limits.host_uid, limits.host_gid)


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
                os.path.exists(control) and "pids" not in _read(control).split()):
            continue
        path = os.path.join(root, f"{PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}")
        try:
            os.mkdir(path)
            with open(os.path.join(path, "pids.max"), "w") as f:
                f.write(str(max_pids))
            return path
        except OSError:
            remove_cgroup(path if os.path.isdir(path) else None)
    return None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def remove_cgroup(path: Optional[str]) -> None:
    """Kill whatever is left in the cgroup, then remove it."""
    for _ in range(100) if path else ():
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = f.read().split()
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            os.rmdir(path)
            return
        except (OSError, ValueError):
            time.sleep(0.01)
    if path and os.path.isdir(path):
        log.warning("sandbox: cgroup %s could not be removed", path)


def sweep_stale() -> int:
    """Remove the folders and cgroups of runs whose reward process died mid-run (a reward timeout kills
    an isolated worker; the kernel kills its sandbox, the leftovers are removed here): those whose
    owner pid (in the name) is gone. Returns how many."""
    removed = 0
    for root in (tempfile.gettempdir(), "/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        for path in glob.glob(os.path.join(root, PREFIX + "*")):
            try:
                os.kill(int(os.path.basename(path)[len(PREFIX):].split("_")[0]), 0)
                continue  # the owner is alive
            except (ValueError, PermissionError):
                continue
            except ProcessLookupError:
                pass
            if root == tempfile.gettempdir():
                shutil.rmtree(path, onerror=_force_remove)
            else:
                remove_cgroup(path)
            removed += 1
    if removed:
        log.warning("sandbox: removed %d leftovers of reward processes that died mid-run", removed)
    return removed


_PROTECTIONS: dict = {}


def protections() -> dict:
    """What the sandbox enforces on this machine, from a probe run (cached); missing layers are logged."""
    if not _PROTECTIONS:
        result = run_sandboxed("pass", SandboxLimits(wall_s=30.0))
        _PROTECTIONS.update(result.protections or {"error": result.stderr[-500:] or result.reason})
        for warning in _PROTECTIONS.get("warnings", []) + ([] if result.ok else [f"probe failed: {result.reason}"]):
            log.warning("sandbox: %s", warning)
    return dict(_PROTECTIONS)


