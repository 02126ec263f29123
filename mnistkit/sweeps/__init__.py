"""Sweeps: specs and their trials (``spec.py``), trials in local workers or Ray tasks
(``workers.py``), and the sweep's report (``sweep.py``)."""
