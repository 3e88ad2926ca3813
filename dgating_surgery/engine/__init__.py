"""The engine: trace a model, find its groups (``rules/`` move element ids through every op),
gate the groups a recipe selects, and cut the dead ones out. Also what reads a gated model
(sparsity, MACs, collapsed groups) and the handling of wrapped models.

Everything around the engine (``training/``, ``checkpoints/``, ``integrations/``, ``plugins/``,
``cli/``) imports it; it imports none of them (``tests/test_layout.py``). Library plugins reach
it through its registries (``extensions``, the rule and fixer tables)."""
