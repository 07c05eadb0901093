"""tokenrelay: a resumable streaming gateway and web chat for OpenAI-compatible LLM APIs."""

from typing import TYPE_CHECKING

from tokenrelay.config import Settings, load_settings
from tokenrelay.version import __version__

if TYPE_CHECKING:
    from starlette.applications import Starlette


def create_app(settings: Settings | None = None) -> "Starlette":
    """Build the ASGI application (imported lazily so ``import tokenrelay`` stays light)."""
    from tokenrelay.app import create_app as _create_app

    return _create_app(settings)


__all__ = ["Settings", "__version__", "create_app", "load_settings"]
