"""Child process that evaluates one reward function: JSON lines in on stdin, out on the original
stdout (the function's own prints go to stderr so they cannot break the protocol).

    python -m miles_ray.rewards.worker SPEC [OPTIONS_JSON]
"""
from __future__ import annotations

import json
import os
import sys


def main() -> None:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    from miles_ray.rewards import build_reward_fn
    from miles_ray.rewards.runner import as_result

    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    fn = build_reward_fn(sys.argv[1], options)
    for line in sys.stdin:
        prompt, response, label = json.loads(line)
        try:
            result = as_result(fn(prompt, response, label))
            reply = {"score": result.score, "reason": result.reason}
        except Exception as err:  # noqa: BLE001
            reply = {"error": f"{type(err).__name__}: {err}"}
        out.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
