"""Flags generated from the options dataclasses: one flag per field, its help, type, choices and
default taken from the field (:func:`loraga_ray.options.opt`), so every subcommand spells the same
option the same way."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Iterable

from ..options import split_names

SUPPRESS = argparse.SUPPRESS


class Deprecated(argparse.Action):
    """An old spelling of a flag: stores into the same field and says what to use instead."""

    def __init__(self, *args, new_flag: str, value_type=None, **kwargs):
        self.new_flag, self.value_type = new_flag, value_type
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated; use {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _kind(f: dataclasses.Field) -> str:
    """bool, list, int, float or str, from the annotation ("float | None" -> float)."""
    return str(f.type).split("[")[0].split(" ")[0]


def flag_of(cls, name: str) -> str:
    f = cls.__dataclass_fields__[name]
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def add_option(group, cls, name: str, *, suppress_default: bool = False, required: bool = False,
               default=dataclasses.MISSING, help: str | None = None) -> None:
    """Add the flag of field ``name`` of dataclass ``cls`` to ``group``.

    ``suppress_default``: leave the field out of the namespace unless given (so ``--resume`` can
    tell given options from saved ones). ``default`` overrides the field's default for this
    command; ``help`` its help text."""
    f = cls.__dataclass_fields__[name]
    meta = f.metadata
    text = help or meta.get("help", "")
    if default is dataclasses.MISSING:
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    kind = _kind(f)
    flag = flag_of(cls, name)
    kwargs: dict = {"dest": name}
    if kind == "bool":
        if meta.get("negate"):
            flag, kwargs["action"] = meta["negate"], "store_false"
        else:
            kwargs["action"] = "store_true"
    else:
        if kind == "list":
            kwargs["nargs"] = "+"
        elif kind in ("int", "float"):
            kwargs["type"] = int if kind == "int" else float
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])  # argparse lists them beside the flag
        else:
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        if default is not None and not required and not suppress_default:
            text += f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"
        elif default is not None and suppress_default:
            text += f" (default: {default})"
    if required:
        kwargs["required"] = True
    kwargs["default"] = SUPPRESS if suppress_default else default
    group.add_argument(flag, help=text, **kwargs)
    for alias in meta.get("aliases", ()):
        group.add_argument(alias, dest=name, action=Deprecated, new_flag=flag, default=SUPPRESS,
                           type=kwargs.get("type"), nargs=kwargs.get("nargs"), metavar=kwargs.get("metavar"),
                           choices=kwargs.get("choices"), help=f"deprecated spelling of {flag}")


def add_options(group, cls, names: Iterable[str], **kwargs) -> None:
    for name in names:
        add_option(group, cls, name, **kwargs)


def given_values(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` present in ``args`` (with target modules split on commas)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    if "target_modules" in values:
        values["target_modules"] = split_names(values["target_modules"])
    return values


COLUMNS = ("task", "text_column", "label_column", "prompt_column", "response_column")
