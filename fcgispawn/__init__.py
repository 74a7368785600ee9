"""fcgispawn: FastCGI spawner, supervisor and WSGI responder.

``serve`` is the library entry point for people who embed the responder in their own program.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "serve"]


def __getattr__(name: str) -> object:
    # Lazy so that ``import fcgispawn`` (e.g. for __version__ in the CLI or the supervisor)
    # does not pull in the responder's threads and protocol code.
    if name == "serve":
        from fcgispawn.runtime import serve

        return serve
    raise AttributeError(name)
