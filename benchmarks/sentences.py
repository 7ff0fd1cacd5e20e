"""Real English sentences read at run time from the docstrings of Python's standard library (none
are stored in this repository): prose for measuring how far int8 moves sentence embeddings."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import random
import re
from pathlib import Path

MODULES = ["argparse", "asyncio.base_events", "collections", "concurrent.futures._base", "configparser", "contextlib", "csv",
           "dataclasses", "datetime", "decimal", "difflib", "email.message", "fractions", "functools", "gettext",
           "glob", "gzip", "heapq", "http.client", "http.server", "imaplib", "inspect", "ipaddress", "json",
           "logging", "mailbox", "multiprocessing.pool", "optparse", "os", "pathlib", "pickle", "pydoc", "queue",
           "random", "shutil", "smtplib", "socket", "sqlite3", "ssl", "statistics", "string", "subprocess",
           "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest.case", "urllib.request",
           "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile"]
SENTENCE_END = re.compile(r"(?<=[a-z][.!?])\s+(?=[A-Z])")


def _docstrings(source: str):
    """Docstrings of a module's source: the module's, its classes' and functions' (nested too).
    Parsed, not imported: what other imports did to the module cannot change the text."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield inspect.cleandoc(ast.get_docstring(node, clean=False) or "")


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    letters = sum(c.isalpha() or c.isspace() for c in sentence)
    return (6 <= len(words) <= 40 and sentence[0].isupper() and sentence[-1] in ".!?"
            and letters >= 0.9 * len(sentence) and not any(mark in sentence for mark in (">>>", "::", "*", "=", "_")))


def english_sentences(count: int = 300, seed: int = 0) -> list[str]:
    """``count`` distinct prose sentences, the same ones for the same Python version and seed."""
    found = set()
    for module_name in MODULES:
        spec = importlib.util.find_spec(module_name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue  # an optional build (tkinter) or a C module
        for doc in _docstrings(Path(spec.origin).read_text(encoding="utf-8")):
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())
                found.update(s for s in SENTENCE_END.split(text) if _is_prose(s))
    sentences = sorted(found)
    if len(sentences) < count:
        raise RuntimeError(f"found only {len(sentences)} sentences in the standard library's docstrings")
    random.Random(seed).shuffle(sentences)
    return sentences[:count]
