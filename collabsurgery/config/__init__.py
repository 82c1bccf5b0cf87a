"""Recipes: the YAML schema, ``key=value`` overrides, validation, and the one place where a
recipe becomes objects (:mod:`.recipe`).

May import: errors, common, models, data, graphs, objectives (their declarations are what a
recipe's ``graph`` and ``objective`` sections are checked against). See docs/architecture.md.
"""
