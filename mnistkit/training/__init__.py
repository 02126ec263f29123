"""Training: the loop (``loop.py``), the session it runs (model, data, optimizer, schedule, RNG),
the optimizer and schedule, evaluation, several trainings in one call (``plan.py``), the LR
range test, distillation, devices and callbacks."""
