"""``reward.fn: code_exec``: run the model's Python code against the sample's tests in the sandbox
(:mod:`miles_ray.rewards.sandbox`, limits from ``reward.sandbox``).

The code is the last ```` ```python ```` (or plain ```` ``` ````) fenced block of the response, else the
whole response. The label holds the tests, in one of two forms:

* **stdin/stdout cases**: a JSON list of ``{"input": str, "output": str}``. The program runs once per
  case (its own sandbox) with ``input`` on stdin; its stdout must equal ``output`` up to trailing
  whitespace on each line and trailing blank lines. The comparison runs here, outside the sandbox.
* **Python test code** (anything else): asserts run after the code, in the same interpreter, in a
  module named ``solution`` (an ``if __name__ == "__main__":`` block of the code does not run). A pass
  needs exit code 0 *and* a random token printed by the harness after the last test, so exiting
  early (``os._exit(0)``, ``sys.exit(0)``) fails. The tests share the process with the code: code
  that inspects the harness's frames, or returns objects whose ``__eq__`` is always true, can fool
  asserts; prefer stdin/stdout cases where that matters. Test code without any ``assert`` or
  ``raise`` (or that does not parse) is a ``bad_label``, as is an empty label.

Score: 1.0 on pass, else ``reward.failure_score`` with a reason (counted per reason): syntax,
no_code, wrong_answer, bad_label, and the sandbox's timeout, cpu, memory, output, file_size,
processes, killed, failed, sandbox_error.
"""
from __future__ import annotations

import ast
import json
import logging
import re
import secrets

from miles_ray.errors import UserValueError
from miles_ray.rewards.registry import RewardResult, register_reward_factory
from miles_ray.rewards.sandbox import SandboxLimits, protections, run_sandboxed
from miles_ray.rewards.seccomp import SeccompUnavailable, filter_program

log = logging.getLogger(__name__)
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

_HARNESS = '''import sys
def _main(token, solution, tests):
    scope = {"__name__": "solution", "__builtins__": __builtins__}
    exec(compile(solution, "solution.py", "exec"), scope)
    exec(compile(tests, "tests.py", "exec"), scope)
    sys.stdout.flush()
    sys.stdout.write("\\n" + token + "\\n")
    sys.stdout.flush()
_main(sys.stdin.readline().strip(), %r, %r)
'''


def extract_code(response: str) -> str:
    """The last fenced Python block, else the whole response."""
    blocks = _FENCE.findall(response)
    return (blocks[-1] if blocks else response).strip("\n")


def parse_cases(label: str):
    """The stdin/stdout cases of a label (JSON, or the Python literal that ``str()`` of a jsonl list gives),
    or None when the label is Python test code."""
    try:
        cases = json.loads(label)
    except (ValueError, TypeError):
        try:
            cases = ast.literal_eval(label) if label.lstrip().startswith("[") else None
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    if isinstance(cases, list) and cases and all(isinstance(c, dict) and {"input", "output"} <= set(c) for c in cases):
        return [(str(c["input"]), str(c["output"])) for c in cases]
    return None


def same_output(got: str, expected: str) -> bool:
    def norm(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().splitlines()]
    return norm(got) == norm(expected)


def has_checks(tests: str) -> bool:
    """Test code must hold an assert or raise somewhere (a label that checks nothing would pass anything)."""
    try:
        return any(isinstance(node, (ast.Assert, ast.Raise)) for node in ast.walk(ast.parse(tests)))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def run_tests(code: str, tests: str, limits: SandboxLimits) -> RewardResult | None:
    """Asserts after the code; None on a pass (exit 0 and the token as the last line of stdout)."""
    token = secrets.token_hex(16)
    result = run_sandboxed(_HARNESS % (code, tests), limits, stdin=token + "\n")
    if result.ok and result.stdout.rstrip().rsplit("\n", 1)[-1] == token:
        return None
    return RewardResult(0.0, result.reason or "failed")


def run_cases(code: str, cases: list, limits: SandboxLimits) -> RewardResult | None:
    """One sandboxed run per case, stopping at the first failure; None when all pass."""
    for stdin, expected in cases:
        result = run_sandboxed(code, limits, stdin=stdin)
        if not result.ok:
            return RewardResult(0.0, result.reason)
        if not same_output(result.stdout, expected):
            return RewardResult(0.0, "wrong_answer")
    return None


def check_seccomp(limits: SandboxLimits) -> None:
    """Refuse to build the reward when the sandbox's seccomp filter cannot be built and it is required."""
    if not limits.require_seccomp:
        log.warning("code_exec: reward.sandbox.require_seccomp is false: the code may run without a syscall filter")
        return
    try:
        filter_program()
    except SeccompUnavailable as err:
        raise UserValueError(f"reward.fn=code_exec: no seccomp filter for the sandbox ({err}). Run scripts/setup.sh "
                             "(pyseccomp; as root it also installs libseccomp2), or set "
                             "reward.sandbox.require_seccomp=false to run the code without one") from None


@register_reward_factory("code_exec")
def code_exec_factory(options: dict):
    """``options``: the ``reward`` section as a dict (``sandbox``, ``failure_score``, ``timeout_s``)."""
    limits = SandboxLimits.from_options(options.get("sandbox"))
    failure = float(options.get("failure_score", 0.0))
    if float(options.get("timeout_s", 1e9)) <= limits.wall_s:
        log.warning("code_exec: reward.timeout_s=%s <= reward.sandbox.wall_s=%s: slow programs are cut by the "
                    "reward timeout (reason 'timeout' from the runner)", options.get("timeout_s"), limits.wall_s)
    check_seccomp(limits)
    log.info("code_exec sandbox protections: %s", protections())

    def code_exec_reward(prompt: str, response: str, label: str) -> RewardResult:
        code = extract_code(response or "")
        if not code.strip():
            return RewardResult(failure, "no_code")
        try:
            compile(code, "solution.py", "exec")
        except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
            return RewardResult(failure, "syntax")
        if not str(label or "").strip():
            return RewardResult(failure, "bad_label")
        cases = parse_cases(label)
        if cases is None and not has_checks(label):
            return RewardResult(failure, "bad_label")
        failed = run_cases(code, cases, limits) if cases else run_tests(code, str(label), limits)
        return RewardResult(1.0) if failed is None else RewardResult(failure, failed.reason)

    return code_exec_reward
