"""The command line: parse options, call the library, render. No logic of its own.

``app.py`` holds the application and what every command shares; each family of commands has
its module (models, training, results, sweep), imported here so that it registers its commands.
torch is imported inside the commands, never at module level: ``mnistkit --help`` stays fast.
"""

from mnistkit.cli.app import app, fail, main
from mnistkit.cli import models, training, results, sweep  # noqa: F401, I001  (they register their commands, in this order)

__all__ = ["app", "fail", "main"]
