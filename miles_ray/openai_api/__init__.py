"""OpenAI-compatible chat/completions over the rollout engines: chat templates with tools, Hermes /
Qwen tool-call parsing, request validation and response shapes that keep the exact token ids and
log-probs (no re-tokenisation drift). Pure library; Ray Serve wraps it in :mod:`actors.openai_serve`."""
from miles_ray.openai_api.chat import parse_tool_calls, render_prompt  # noqa: F401
