"""The Store: conversations and messages, behind one small interface.

Routes and generations call these methods, never SQL. ``owner`` scopes every read and
write to one tenant (a client API key's id; ``"local"`` when no keys are configured).
Something that is not the caller's is reported exactly like something that does not exist.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class AssistantResult:
    """Everything recorded about an assistant message when it ends (or is checkpointed)."""

    state: str  # streaming | complete | cancelled | error | interrupted
    content: str
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    model_used: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage_estimated: bool = False
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    # Every upstream request of the answer: route, status, time, usage and its source.
    attempts: list[dict[str, Any]] | None = None


# Turn.parent_id of a turn that continues the branch shown (message ids are never empty).
FOLLOW_ACTIVE = ""


@dataclass(slots=True, frozen=True)
class Turn:
    """What a chat request adds to its conversation before the answer: the conversation
    itself when ``new`` (id chosen by the caller, ``title``), then ``user_messages``,
    the first following the stored message ``parent_id`` (None: a first message, a new
    version of the conversation's first turn; ``FOLLOW_ACTIVE``, the default: the last
    message of the branch shown), each next one the one before, and the answer the last.
    The answer's branch is then the one shown."""

    conversation_id: str
    new: bool
    title: str
    user_messages: Sequence[str] = ()
    parent_id: str | None = ""  # FOLLOW_ACTIVE


class Store(abc.ABC):
    """Persistence of conversations and messages."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect, apply migrations, and mark messages left ``streaming`` as ``interrupted``."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Dispose of connections."""

    @abc.abstractmethod
    async def ensure_conversation(self, owner: str, conversation_id: str | None, title: str) -> str:
        """Return ``conversation_id`` if it is the owner's, create one when it is None.

        Raises :class:`~tokenrelay.errors.StreamNotFound`-like ``BadRequest(404)`` when the id
        is not the owner's.
        """

    @abc.abstractmethod
    async def add_user_message(self, owner: str, conversation_id: str, content: str) -> str:
        """Store a user message; returns its id."""

    @abc.abstractmethod
    async def find_continuation(
        self, owner: str, conversation_id: str, said: Sequence[tuple[str, str]]
    ) -> tuple[str | None, int]:
        """Where the ``(role, text)`` messages a request sends leave the stored
        conversation: ``(parent_id, matched)``, the last stored message they follow and
        how many of them are already stored (one read). A 404 ``BadRequest`` when the
        conversation is not the owner's."""

    @abc.abstractmethod
    async def set_active(self, owner: str, conversation_id: str, message_id: str) -> bool | None:
        """Show the branch through ``message_id`` (down to its newest leaf). None when the
        conversation is not the owner's, False when the message is not in it."""

    @abc.abstractmethod
    async def begin_assistant(
        self,
        owner: str,
        conversation_id: str,
        message_id: str,
        stream_id: str,
        model_requested: str,
    ) -> None:
        """Create the assistant message in state ``streaming``."""

    @abc.abstractmethod
    async def begin_answer(
        self, owner: str, turn: Turn, message_id: str, stream_id: str, model_requested: str
    ) -> None:
        """Record ``turn`` and create the assistant message in state ``streaming``.

        The hot path of ``POST /api/chat``: a store may return before the write is
        committed (it is then queued, ahead of the message's checkpoints and finish, and
        this store's reads wait for it). Raises
        :class:`~tokenrelay.errors.ServiceUnavailable` when the database is known down.
        """

    @abc.abstractmethod
    async def checkpoint(self, message_id: str, content: str, reasoning: str) -> None:
        """Save the text so far of a message still streaming."""

    @abc.abstractmethod
    async def finish_assistant(self, message_id: str, result: AssistantResult) -> None:
        """Record the final state of an assistant message."""

    @abc.abstractmethod
    async def mark_interrupted(
        self, message_id: str, content: str | None = None, reasoning: str | None = None
    ) -> bool:
        """Mark a message still ``streaming`` as ``interrupted``, keeping its text.

        For a reader that finds the instance generating the message dead (cluster). With
        ``content`` (and ``reasoning``), the text relayed as the journal kept it replaces
        the last checkpoint, also if an orphan sweep marked the message first.
        """

    @abc.abstractmethod
    async def interrupt_orphans(self, older_than_s: float) -> int:
        """Mark ``streaming`` messages not checkpointed for ``older_than_s`` as interrupted."""

    @abc.abstractmethod
    async def list_conversations(
        self, owner: str, limit: int = 50, offset: int = 0, query: str = ""
    ) -> list[dict[str, Any]]:
        """Newest first: id, title, created_at, updated_at; with ``query``, only those whose
        title or any message's text contains it (case-insensitive)."""

    @abc.abstractmethod
    async def get_conversation(self, owner: str, conversation_id: str) -> dict[str, Any] | None:
        """The conversation with the messages of the branch shown, in order, or None.

        Each message has ``parent_id`` and its turn's ``version`` (1-based),
        ``versions`` and ``sibling_ids`` (oldest first)."""

    @abc.abstractmethod
    async def rename_conversation(self, owner: str, conversation_id: str, title: str) -> bool:
        """False when there is no such conversation of this owner."""

    @abc.abstractmethod
    async def delete_conversation(self, owner: str, conversation_id: str) -> bool:
        """False when there is no such conversation of this owner."""

    @abc.abstractmethod
    async def model_stats(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Per model used: count, ttft p50/p95, tokens/s p50, error and cancel rates; of
        ``owner``'s messages only, unless None (every tenant)."""
