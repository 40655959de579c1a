"""Rollout dumps (jsonl, one Sample per line with its step) for the debug modes: generate without
training (``python -m jobs.rollout_only``) and train without generating (``rollout.replay_dump``)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from miles_ray.sample import Sample


def write_samples(path: str | Path, step: int, samples: list) -> None:
    with open(path, "a") as f:
        for s in samples:
            f.write(json.dumps({"step": step, **s.to_dict()}) + "\n")


class DumpReader:
    """Steps of a dump in order; ``next_step()`` cycles when the dump runs out."""

    def __init__(self, path: str | Path):
        by_step = defaultdict(list)
        with open(path) as f:
            for i, line in enumerate(f):
                row = json.loads(line)
                step = row.pop("step")
                try:
                    by_step[step].append(Sample(**row))
                except TypeError as err:
                    raise ValueError(f"{path}: line {i + 1} is not a sample dump row ({err})") from None
        if not by_step:
            raise ValueError(f"{path}: empty rollout dump")
        self.steps = [by_step[k] for k in sorted(by_step)]
        self.cursor = 0

    def next_step(self) -> list:
        samples = self.steps[self.cursor % len(self.steps)]
        self.cursor += 1
        return [Sample(**s.to_dict()) for s in samples]
