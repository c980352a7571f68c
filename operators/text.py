"""Header text made safe to echo: control characters escaped, length bounded.

DICOM header fields (SeriesDescription, ProtocolName, UIDs of broken files) and file names reach messages, logs and
reports. A value holding CR, LF or ESC could forge a log line or drive a terminal, so every message that echoes such
text passes it through :func:`printable` first.
"""

from __future__ import annotations

__all__ = ["MAX_ECHOED_CHARACTERS", "printable"]

MAX_ECHOED_CHARACTERS = 200  # longer header values are cut (with an ellipsis) where a message echoes them


def printable(text: object, limit: int | None = MAX_ECHOED_CHARACTERS) -> str:
    """``text`` with every control character (C0, DEL, C1, line and paragraph separators) escaped as ``\\xNN`` or
    ``\\uNNNN`` and, when ``limit`` is set, cut to that many characters.

    Args:
        text: any object; its ``str()`` is used.
        limit: longest result before the ellipsis; ``None`` keeps the whole text (whole messages).
    """
    value = str(text)
    if limit is not None and len(value) > limit:
        value = value[:limit] + "..."
    return "".join(_escaped(character) for character in value)


def _escaped(character: str) -> str:
    code = ord(character)
    if code < 0x20 or 0x7F <= code < 0xA0:
        return f"\\x{code:02x}"
    if code in (0x2028, 0x2029, 0x85):
        return f"\\u{code:04x}"
    return character
