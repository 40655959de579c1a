"""Reward functions used by tests through the ``pkg.module:fn`` import path."""
import time


def length_reward(prompt, response, label):
    return float(len(response))


def raising_reward(prompt, response, label):
    if response == "boom":
        raise ValueError("bad sample")
    return 1.0


def hanging_reward(prompt, response, label):
    if response == "hang":
        time.sleep(60)
    return 1.0


def noisy_reward(prompt, response, label):
    print("this print must not break the worker protocol")
    return 2.0


def stamp_reward(prompt, response, label):
    """Appends when it ran to the file the label names: tests compare with generation times."""
    with open(label, "a") as f:
        f.write(f"reward {time.time()}\n")
    return 1.0
