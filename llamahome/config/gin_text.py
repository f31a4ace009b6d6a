"""Reading a saved gin config text (a checkpoint's, a run dir's config.gin) without binding it."""

from __future__ import annotations

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
