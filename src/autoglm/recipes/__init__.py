"""Recipes: one module per workflow, each a typed config (a dataclass built by
`autoglm.settings.load_config` from defaults, a YAML file and overrides) and the function
that runs it. The CLI and the benchmarks call these; nothing else assembles a workflow.

Importing this package is cheap (no torch): each recipe module imports its heavy parts
when it runs.
"""
