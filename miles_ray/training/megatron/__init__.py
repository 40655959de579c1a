"""The megatron-core training backend (``train.backend: megatron``): see docs/megatron.md.
Nothing here imports megatron at package import; modules import it where they use it."""
