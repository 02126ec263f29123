"""The user's own models: references (``file.py:Net``, ``pkg.mod:Net``, YAML), running only a model
file's definitions, identity by architecture, rebuilding a run's model from its record, and
which code the user has named (trust)."""
