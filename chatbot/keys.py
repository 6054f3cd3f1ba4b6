"""Every Redis key and channel name the service uses, in one place.

Each session's keys share the hash tag `{<session id>}` so that one Lua script
can touch all of them on Redis Cluster.
"""

from __future__ import annotations

PREFIX = "chatbot"

# Control channel on a single Redis: cancel requests, broadcast to every instance.
# On a cluster each session has its own (cancel_channel), so a notice reaches one shard only.
CANCEL_CHANNEL = f"{PREFIX}:cancel"


def stream(session_id: str) -> str:
    """The session's event stream: one entry per event."""
    return f"{PREFIX}:{{{session_id}}}:events"


def meta(session_id: str) -> str:
    """Hash: conversation_id, message, status, cancel flag, terminal id, the last entry's id."""
    return f"{PREFIX}:{{{session_id}}}:meta"


def lease(session_id: str) -> str:
    """Short-lived key held by the task generating the answer; gone means the producer died."""
    return f"{PREFIX}:{{{session_id}}}:lease"


def notify_channel(session_id: str) -> str:
    """Pub/sub notice that the session's stream grew: the entry with the id before it, or only the new id.

    See `store.Notice`. A notice is never the only copy: a reader that misses one reads the stream.
    """
    return f"{PREFIX}:{{{session_id}}}:grew"


def cancel_channel(session_id: str) -> str:
    """Cluster mode: sharded pub/sub notice to the instance generating the session that a cancel was asked."""
    return f"{PREFIX}:{{{session_id}}}:cancel"


def conversation(conversation_id: str) -> str:
    """Hash of a conversation's bookkeeping (its history lives beside it)."""
    return f"{PREFIX}:conv:{{{conversation_id}}}"


def history(conversation_id: str) -> str:
    """List of a conversation's turns, oldest first; shares the conversation's hash tag."""
    return f"{PREFIX}:conv:{{{conversation_id}}}:history"


def rate(address: str) -> str:
    """Counter of sessions created by one client address in the current window."""
    return f"{PREFIX}:rate:{{{address}}}"


def session_id_from_channel(channel: str) -> str:
    """Inverse of notify_channel and cancel_channel."""
    return channel[channel.index("{") + 1 : channel.index("}")]
