"""The op rules of group discovery, as a package: the contract a rule may use (``context``), the
rules by family (``structural``, ``elementwise``, ``movement``, ``normalization``, ``pooling``), and
the table that maps every spelling of an op to its rule (``table``)."""
from .context import SPLIT_POLICIES, Attachment, ParamRef, RuleContext, Space, Visit, unknown
from .pooling import output
from .table import GRAPH_PASSES, PREPASSES, has_module_rule, register_module_rule, register_rms_norm, rule_for

__all__ = ["RuleContext", "ParamRef", "Space", "Attachment", "Visit", "SPLIT_POLICIES", "output", "PREPASSES", "GRAPH_PASSES", "has_module_rule", "register_rms_norm", "register_module_rule",
           "rule_for", "unknown"]
