"""Training a gated model: the D-Gating regularizer and its checks (``regularizer``), lambda
schedules and size targets (``schedule``), distillation from the dense model (``distill``), the
search for lambda (``search``) and distributed training (``distributed``)."""
