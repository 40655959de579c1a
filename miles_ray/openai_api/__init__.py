"""OpenAI-compatible chat/completions over the rollout engines: chat templates with tools, Hermes /
Qwen tool-call parsing, request validation and response shapes that keep the exact token ids and
log-probs (no re-tokenisation drift). Pure library; Ray Serve wraps it in :mod:`actors.openai_serve`.

- :mod:`.chat`: prompts with tools, tool calls parsed back;
- :mod:`.protocol`: request validation (400 bodies naming the field) -> prompt ids + SamplingParams;
- :mod:`.responses`: response bodies, SSE chunks, stop sequences, usage;
- :mod:`.app`: the service over a ``Backend`` (``generate(input_ids, params, n)``), a FastAPI app
  factory, and an in-process backend over a RolloutEngine object.
"""
from miles_ray.openai_api.chat import parse_tool_calls, render_prompt  # noqa: F401
from miles_ray.openai_api.protocol import RequestError, ServeSettings  # noqa: F401
