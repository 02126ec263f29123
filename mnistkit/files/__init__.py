"""Reading and writing files as possibly hostile or damaged: bounded reads and YAML/JSON records
(``safeio``), JSON that refuses what JSON cannot say (``strictjson``), and writes that are never
half-done (``outputs``: atomic replace, symlinks and devices refused, a full disk one line). The
bottom layer: it imports nothing of mnistkit but its errors, and every package above uses it."""
