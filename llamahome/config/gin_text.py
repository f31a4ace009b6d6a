"""Reading a saved gin config text (a checkpoint's, a run dir's config.gin) without binding it."""

from __future__ import annotations

import re
from typing import Any

from gin import config_parser


def gin_bindings(text: str, configurable: str) -> dict[str, Any]:
    """The unscoped bindings `configurable.<arg> = value` in a gin config text, macros resolved.

    Read with gin's parser without touching the global gin config, so a saved run config can
    be inspected while another is bound.
    """
    class Delegate(config_parser.ParserDelegate):
        def configurable_reference(self, scoped_name, evaluate):
            return ("@", scoped_name)

        def macro(self, name):
            return ("%", name)

    macros, bindings = {}, {}
    for statement in config_parser.ConfigParser(text, Delegate()):
        if not isinstance(statement, config_parser.BindingStatement) or statement.scope:
            continue
        if not statement.arg_name:
            macros[statement.selector] = statement.value
        elif statement.selector.rsplit(".", 1)[-1] == configurable:
            bindings[statement.arg_name] = statement.value

    def resolve_macro(value, depth=0):
        while isinstance(value, tuple) and len(value) == 2 and value[0] == "%" and depth < 16:
            value, depth = macros.get(value[1]), depth + 1
        return value

    return {arg: resolve_macro(value) for arg, value in bindings.items()}


def gin_statements(config: str) -> list[str]:
    """Splits gin text into statements, each with its line ends: a statement spans lines while a
    bracket, a string or a `\\` continuation is open; a comment or blank line is one of its own."""
    statements, current = [], []
    depth, quote = 0, ""
    for line in config.splitlines(keepends=True):
        current.append(line)
        continued, i = False, 0
        while i < len(line):
            char = line[i]
            if quote:
                if char == "\\":
                    i += 1
                elif line.startswith(quote, i):
                    i += len(quote) - 1
                    quote = ""
            elif char == "#":
                break
            elif char in "'\"":
                quote = char * 3 if line.startswith(char * 3, i) else char
                i += len(quote) - 1
            elif char in "([{":
                depth += 1
            elif char in ")]}":
                depth = max(depth - 1, 0)
            elif char == "\\" and not line[i + 1:].strip():
                continued = True
            i += 1
        if len(quote) == 1:  # a one-quote string cannot span lines unless escaped
            quote = "" if not line.rstrip("\r\n").endswith("\\") else quote
        if depth == 0 and not quote and not continued:
            statements.append("".join(current))
            current = []
    if current:
        statements.append("".join(current))
    return statements


_BINDING = re.compile(r"\s*([A-Za-z_][\w./]*)\s*=(.*)", re.S)


def binding_statements(text: str) -> list[tuple[str, str, str]]:
    """(name, value text, whole statement) of each `name = value` in gin text, in order.

    Textual, like `gin_statements`: a value is as written (wrapped over lines as gin wrapped
    it); imports, includes, comments and blank lines are left out.
    """
    found = []
    for statement in gin_statements(text):
        match = _BINDING.match(statement)
        if match and not statement.lstrip().startswith("#"):
            found.append((match.group(1), match.group(2), statement))
    return found
