"""Raw-text helpers shared by the tools: opening .jsonl/.txt (optionally .gz), and a script-based language guess.

`detect_language` is a cheap Unicode-script vote for documents that carry no label: Hangul -> "ko",
any Kana -> "ja", Han without Kana -> "zh", mostly Latin letters -> "latin", else "other".
"""
from __future__ import annotations

import gzip
import io
import os


def open_text(path: str):
    """Text stream for a file, transparently decompressing `.gz`."""
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def is_jsonl(path: str) -> bool:
    base = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(base)[1].lower() in (".jsonl", ".json", ".ndjson")


def detect_language(text: str, sample_chars: int = 2000) -> str:
    hangul = kana = han = latin = 0
    for ch in text[:sample_chars]:
        o = ord(ch)
        if 0xAC00 <= o <= 0xD7A3 or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F:
            hangul += 1
        elif 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9F:
            kana += 1
        elif 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF:
            han += 1
        elif ch.isascii() and ch.isalpha() or 0xC0 <= o <= 0x24F:
            latin += 1
    letters = hangul + kana + han + latin
    if letters == 0:
        return "other"
    if hangul >= 0.2 * letters:
        return "ko"
    if kana > 0 and kana + han >= 0.2 * letters:
        return "ja"
    if han >= 0.2 * letters:
        return "zh"
    return "latin" if latin >= 0.5 * letters else "other"
