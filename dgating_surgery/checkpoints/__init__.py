"""Checkpoints: gated and slim checkpoints (``checkpoint``) and their manifest (``manifest``),
the MODEL specs a checkpoint names and how they are rebuilt (``models``, ``trust``), example
inputs as shapes and dtypes (``inputs``), and atomic writes (``writing``)."""
