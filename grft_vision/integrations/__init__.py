"""GRFT inside the trainers users already have.

- :mod:`grft_vision.integrations.timm`: timm's ``train.py`` — adapter-only checkpoints for timm's
  ``CheckpointSaver`` and the resume that reads them (``python -m grft_vision.export`` turns any of its
  checkpoints into plain timm weights).
- :mod:`grft_vision.integrations.hf`: ``transformers.Trainer`` — :class:`~grft_vision.integrations.hf.GRFTTrainer`
  (adapter-sized checkpoints, resume, the L2 regulariser in the loss, a merged model at the end).

Each submodule imports its trainer's library; import the one you use.
"""
