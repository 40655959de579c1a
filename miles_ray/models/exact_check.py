"""Startup self-test of the exact forward (``algorithm.true_on_policy``): probes at the shapes,
thread counts and memory placements of the run it guards; a difference refuses the mode.

Probes (all bit for bit against one reference: the trainer path's full forward of two probe rows
of ``max_len`` tokens, the longest sequence the run can hold):

- decode == full forward at every position up to ``max_len``, with the probe rows in the last slots
  of decode batches of 1, ``CHUNK + 1`` (a second window of every fixed-size call) and each size in
  ``batch_sizes`` (the engine passes its ``max_running``);
- the probe rows inside trainer batches of each size (the trainer's micro-batch size);
- the full forward and a decode under each thread count in ``threads`` (1, 2 and the process's);
- the full forward with every weight moved to misaligned addresses (4, 8, 16 and 32 bytes past a
  64-byte boundary): BLAS kernels choose code paths by address, and engines and trainers allocate
  their parameters differently;
- all of it under the CPU capability in use (``torch.backends.cpu.get_cpu_capability()``, which
  ``ATEN_CPU_CAPABILITY`` can lower): the capability is named in every refusal and in the
  fingerprint that :func:`self_test` returns (engines and trainers on different capabilities do
  not compute the same bits; compare fingerprints where they run on different machines).
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch

from miles_ray.errors import UserError

CHUNK = 64


def capability() -> str:
    return torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "unknown"


def _refuse(what: str, diff: float, device) -> UserError:
    return UserError(f"algorithm.true_on_policy: the startup self-test found {what} (max |diff| {diff:.3g}) on this "
                     f"machine ({device}, CPU capability {capability()}, {torch.get_num_threads()} threads); true "
                     "on-policy is refused here (set algorithm.true_on_policy=false)")


def _check(got: torch.Tensor, want: torch.Tensor, what: str, device) -> None:
    if not torch.equal(got, want):
        raise _refuse(what, (got - want).abs().max().item(), device)


def _decode_all(forward, seqs: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of every row of ``seqs [B, L]`` at positions ``prompt-1 .. L-2`` via prefill+decode."""
    B, L = seqs.shape
    device = seqs.device
    cache = forward.new_cache(B, forward.max_len)
    out = [forward.prefill(seqs[:, :prompt], torch.full((B,), prompt, device=device), cache,
                           torch.arange(B, device=device))]
    for t in range(prompt, L - 1):
        out.append(forward.decode(seqs[:, t], cache))
    return torch.stack(out, 1)


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _misaligned(model: torch.nn.Module, offset: int):
    """Every parameter's data moved to ``offset`` bytes past a 64-byte boundary (restored after)."""
    saved = [(p, p.data) for p in model.parameters()]
    try:
        for p, data in saved:
            elem = data.element_size()
            buf = torch.empty(data.numel() + 2 * 64 // elem, dtype=data.dtype, device=data.device)
            start = ((offset - buf.data_ptr()) % 64) // elem
            moved = buf[start:start + data.numel()].view(data.shape)
            moved.copy_(data)
            p.data = moved
        yield
    finally:
        for p, data in saved:
            p.data = data


@torch.no_grad()
def self_test(forward, vocab_size: int, batch_sizes=(), threads=(), length: int | None = None, seed: int = 0) -> dict:
    """Run the probes (module doc); raises :class:`UserError` on the first difference. Returns a
    fingerprint ``{"capability", "digest"}`` of the reference logits."""
    device = next(forward.hf.parameters()).device
    L = min(length or forward.max_len, forward.max_len)
    gen = torch.Generator().manual_seed(seed)
    others = torch.randint(3, vocab_size, (max(batch_sizes or (1,)) + CHUNK + 4, L), generator=gen).to(device)
    probes = others[:2]
    prompt = min(4, L - 1)
    ref = forward.logits(forward.hidden(probes))  # [2, L, V]
    want = ref[:, prompt - 1:L - 1]
    sizes = sorted({1, CHUNK + 1, *batch_sizes})
    for B in sizes:
        batch = torch.cat([others[2:2 + max(B - 2, 0)], probes])[-B:] if B >= 2 else probes[:1]
        got = _decode_all(forward, batch, prompt)[-min(B, 2):]
        _check(got, want[:min(B, 2)] if B >= 2 else want[:1], f"decode logits (batch of {B}, up to position {L - 1}) "
               "differing from the full forward", device)
    for R in sorted({1, *batch_sizes}):
        rows = torch.cat([others[2:2 + max(R - 1, 0)], probes[:1]])
        _check(forward.logits(forward.hidden(rows))[-1], ref[0], f"the full forward of a sequence in a batch of {R} "
               "differing from the same sequence in a batch of 2", device)
    for n in sorted({1, 2, torch.get_num_threads(), *threads}):
        with _threads(n):
            _check(forward.logits(forward.hidden(probes)), ref, f"the full forward on {n} threads differing", device)
            _check(_decode_all(forward, probes, prompt), want, f"decode on {n} threads differing", device)
    for offset in (4, 8, 16, 32):
        with _misaligned(forward.hf, offset):
            _check(forward.logits(forward.hidden(probes)), ref,
                   f"the full forward differing with the weights {offset} bytes off a 64-byte boundary", device)
    digest = hashlib.sha256(ref.cpu().numpy().tobytes()).hexdigest()[:16]
    return {"capability": capability(), "digest": digest}
