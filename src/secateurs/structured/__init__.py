"""Structured pruning: remove whole channels, neurons and heads, physically.

`prune_structured` traces the model, groups coupled channels (`graph.groups`), scores
each unit by summing a criterion's element scores over every parameter slice of the
unit, removes the lowest units of each group (or globally), and cuts the layers with
`surgery`. The result is an ordinary, smaller nn.Module with the same output shapes.

A ratio is a fraction of each group's *units* (channels or heads). Cutting 50% of the
channels of a layer that is pruned on both its input and output side leaves about 25%
of its weights: say "remove half the channels", not "half the parameters". Use a
`target` such as "macs=0.5" to ask for a cost instead.

The road, one module each: `units` (scores and choice of units), `budget` (targets,
costs, search, latency re-check), `cut` (apply keeps, roles, head counts), `rehearse`
(the data-free check), `apply` (carry out a chosen cut), `plan` (the record, replay),
`prune` (the front door).
"""
from .apply import GRAPH_COSTS, cut_shapes
from .budget import (
           BUDGETS,
           LATENCY_CHECKS,
           SEARCH_STEPS,
           TARGET_FORMS,
           Budget,
           parse_target,
)
from .cut import HEAD_COUNT_ATTRIBUTES, ROLES, apply_keeps
from .plan import PLANS_ATTRIBUTE, GroupPlan, StructuredPlan, applied_plans, replay
from .prune import prune_structured
from .units import UNIT_KINDS

__all__ = ["BUDGETS", "Budget", "GRAPH_COSTS", "GroupPlan", "HEAD_COUNT_ATTRIBUTES", "LATENCY_CHECKS", "PLANS_ATTRIBUTE",
           "ROLES", "SEARCH_STEPS", "StructuredPlan", "TARGET_FORMS", "UNIT_KINDS", "applied_plans", "apply_keeps",
           "cut_shapes", "parse_target", "prune_structured", "replay"]
