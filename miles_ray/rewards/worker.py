"""Child process that evaluates one reward function: JSON lines in on stdin, out on the original
stdout (the function's own prints go to stderr so they cannot break the protocol)."""
from __future__ import annotations

import json
import os
import sys


def main() -> None:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    from miles_ray.rewards import resolve_reward_fn

    fn = resolve_reward_fn(sys.argv[1])
    for line in sys.stdin:
        prompt, response, label = json.loads(line)
        try:
            reply = {"score": float(fn(prompt, response, label))}
        except Exception as err:  # noqa: BLE001
            reply = {"error": f"{type(err).__name__}: {err}"}
        out.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
