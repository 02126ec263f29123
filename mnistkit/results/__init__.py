"""What runs measured, against the change-log: the report (``compare.py``), the gate
(``check.py``), the write-up (``report.py``) and training curves (``curves.py``)."""
