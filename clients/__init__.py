"""Python clients for a loraplex server."""

from loraplex.clients.client import AsyncClient, Client, GenerationStream, ServerInfo
from loraplex.clients.errors import LoraplexClientError
from loraplex.clients.messages import Adapter, Chunk, Generation
from loraplex.clients.security import Security, read_token

__all__ = [
    "Adapter",
    "AsyncClient",
    "Chunk",
    "Client",
    "Generation",
    "GenerationStream",
    "LoraplexClientError",
    "Security",
    "ServerInfo",
    "read_token",
]
