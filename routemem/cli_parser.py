"""The command line's argparse extensions: config overrides anywhere on the line, option values that
start with '-', and a help that lists the registered layers."""

from __future__ import annotations

import argparse
import sys
import textwrap


class RoutememParser(argparse.ArgumentParser):
    """argparse, plus what two subcommands need (set as attributes on their parsers):

    ``takes_overrides``: ``key.sub=value`` words anywhere on the line are config overrides, added to
    ``overrides`` in the order given (argparse alone takes one unbroken run of them, so in
    ``--out o a=1 --json b=2`` it refused b=2); any other unknown word is still an error.
    ``dash_values``: options whose value may start with '-' (``--shard -1/2``), which argparse
    would take for an option and answer "expected one argument"; ``--shard X`` is read as
    ``--shard=X``, so the command's own check can say what is wrong with the value.
    """

    takes_overrides = False
    dash_values: tuple[str, ...] = ()

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        glued = []
        for arg in args:
            if glued and glued[-1] in self.dash_values:
                glued[-1] = f"{glued[-1]}={arg}"
            else:
                glued.append(arg)
        namespace, extras = super().parse_known_args(glued, namespace)
        if self.takes_overrides:
            overrides = [arg for arg in extras if "=" in arg and not arg.startswith("-")]
            extras = [arg for arg in extras if arg not in overrides]
            namespace.overrides = [*(namespace.overrides or []), *overrides]
            if extras:
                self.error(f"unrecognized arguments: {' '.join(extras)} (a config override is key.sub=value)")
        return namespace, extras


class HelpWithLayers(argparse.Action):
    """-h/--help that lists the registered mixers and FFNs under the help. Finding them imports
    every layer file, and so torch (about 1.5 s): paid only when the help is asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from routemem.layers.registry import registered_names

        mixers, ffns = registered_names()
        layers = "\n".join(textwrap.fill(f"{what}: {', '.join(names)}", width=78, subsequent_indent="  ",
                                         break_on_hyphens=False)
                           for what, names in (("mixers (model.mixer)", mixers), ("FFNs (model.ffn)", ffns)))
        parser.epilog = f"{parser.epilog}\n\n{layers}" if parser.epilog else layers
        parser.print_help()
        parser.exit()
