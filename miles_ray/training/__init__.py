"""Training backends behind one trainer interface (:mod:`.backends`, ``train.backend``).

- here: what every backend shares: the rank's process-group collectives (:mod:`.collectives`),
  the torch trainer base (:mod:`.base`), batching and packing, the RL loss mixin
  (:mod:`.policy_loss`), SFT, precision, learning-rate schedules, the checkpoint folder format
  (:mod:`.checkpoint_format`);
- :mod:`.fsdp`: transformers models under DDP / FSDP2 (policy, critic, draft; sharded checkpoints);
- :mod:`.megatron`: megatron-core models (TP/PP/SP; megatron distributed checkpoints).
"""
