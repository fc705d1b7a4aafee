"""Tokens as a reader sees them. A byte-level BPE token can be half of a UTF-8 character: decoded alone it is the
replacement character '\ufffd', and two different ids (e.g. GPT-2's 447 and 8582) print as the same '�'. Such a
token, or an empty one, is shown with its id; any other as its repr(), which already tells every other token
apart (quotes show leading spaces; escapes show newlines and invisible characters). Used by the terminal report
and the dashboard alike."""

from __future__ import annotations


def token_repr(text: str, token_id: int) -> str:
    """repr(text), with ' (id N)' after a token that is empty or holds the replacement character."""
    shown = repr(text)
    return f"{shown} (id {int(token_id)})" if not text or "\ufffd" in text else shown
