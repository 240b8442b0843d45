"""Command-line options generated from the config models, so each setting is declared once (in its stage's config).

Every field of a stage config becomes an option named like the field (``radius_m`` -> ``--radius-m``; for ``run``
and ``archive`` prefixed with the stage: ``--export-radius-m``), with the field's description as help and its
default as the shown default. ``--config FILE`` reads a YAML or JSON file first; options given on the command
line override it. Older option names stay as hidden aliases that set the same field.

Only what the user typed reaches the config: an option left out keeps the file's value, else the model's default.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from stages.config import PipelineConfig, problems
from stages.core.errors import PipelineError
from stages.core.fields import StageConfig

STAGE_FILE_HELP = ("YAML or JSON settings: a whole pipeline config (its {stage} section is used) or only the "
                   "{stage} section (field: value); options given here override it")
PIPELINE_FILE_HELP = ("YAML or JSON pipeline config: stage name -> its settings (field: value), e.g. "
                      "'optimize: {preset: paper}'; options given here override it")


@dataclass(frozen=True)
class Alias:
    """An older option name that keeps its meaning: it sets ``field`` (of ``stage``, for run and archive).

    ``negates``: a bare flag that sets a bool field to False (``--no-depth`` -> ``use_depth=False``).
    """

    name: str
    field: str
    stage: str | None = None
    negates: bool = False


@dataclass(frozen=True)
class _Option:
    """One generated command-line option and the config field it sets."""

    param: str
    decls: tuple[str, ...]
    stage: str
    field: str
    annotation: Any
    default: Any
    help: str
    convert: Callable[[Any, str], Any]
    hidden: bool = False
    panel: str | None = None
    metavar: str | None = None

    @property
    def name(self) -> str:
        """The option as typed, for messages (``--use-masks``, not ``--use-masks/--no-use-masks``)."""
        return self.decls[0].split("/")[0]

    def parameter(self) -> inspect.Parameter:
        info = typer.Option(*self.decls, help=self.help, hidden=self.hidden, rich_help_panel=self.panel,
                            metavar=self.metavar, show_default=self.default is not None)
        return inspect.Parameter(self.param, inspect.Parameter.KEYWORD_ONLY, default=self.default,
                                 annotation=Annotated[self.annotation, info])


# --- one field -> one option ---------------------------------------------------------------------------------


def split_values(values: list[str] | None) -> list[str] | None:
    """``--cameras a,b --cameras c`` -> [a, b, c]; not given -> None (given empty -> [], e.g. no hold-outs)."""
    if not values:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def parse_assignments(values: list[str] | None, option: str) -> dict:
    """``NAME=VALUE`` items -> {NAME: VALUE}; values are read as JSON when they parse, else kept as text."""
    parsed = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"{option} {item!r}: write it as NAME=VALUE, e.g. hash.n_grids=8")
        try:
            parsed[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key.strip()] = raw
    return parsed


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None was allowed)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(annotation)):
            return args[0], True
    return annotation, False


@dataclass(frozen=True)
class _Form:
    """How a field is typed on the command line."""

    annotation: Any  # what typer parses
    convert: Callable[[Any, str], Any] = lambda value, option: value  # typer's value -> the field's value
    metavar: str | None = None
    hint: str = ""  # appended to the field's description


def _cli_form(field: FieldInfo) -> _Form:
    """The command-line form of a field. Choices stay text for typer, so that a wrong one is reported by pydantic
    in one line naming the option, like every other bad value."""
    inner, optional = _without_none(field.annotation)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if inner in (bool, int, float, str):
        return _Form(Optional[inner] if optional else inner)
    if origin is Literal:
        return _Form(Optional[str] if optional else str, metavar="[" + "|".join(map(str, args)) + "]")
    if origin is list:
        return _Form(Optional[list[str]], lambda value, option: split_values(value), hint="repeat or comma-separate")
    if origin is dict:
        return _Form(Optional[list[str]], lambda value, option: parse_assignments(value, option) or None,
                     metavar="NAME=VALUE", hint="repeatable; VALUE is read as JSON when it parses")
    if origin is tuple and args and all(typing.get_origin(arg) is tuple for arg in args):
        sizes = [len(typing.get_args(arg)) for arg in args]  # a tuple of tuples, typed as one flat list of values
        flat = tuple(item for arg in args for item in typing.get_args(arg))

        def nest(value: tuple | None, option: str) -> tuple | None:
            if value is None:
                return None
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            return tuple(tuple(value[start:start + size]) for start, size in zip(starts, sizes))

        return _Form(Optional[tuple[flat]], nest, hint=f"{len(flat)} values")  # type: ignore[valid-type]
    if origin is tuple and args and Ellipsis not in args:
        return _Form(Optional[inner] if optional else inner, hint=f"{len(args)} values")
    raise TypeError(f"no command-line form for field type {field.annotation!r}")


def _cli_default(field: FieldInfo) -> Any:
    """The model's default as typer shows it (None where the command line has no form of it, e.g. ``{}``)."""
    default = field.get_default(call_default_factory=True)
    if isinstance(default, dict) or (isinstance(default, tuple) and default and isinstance(default[0], tuple)):
        return None
    return default


def _option(stage: str, name: str, field: FieldInfo, prefix: str, panel: str | None) -> _Option:
    form = _cli_form(field)
    dashed = "--" + (prefix + name).replace("_", "-")
    decls = (f"{dashed}/--no-{dashed[2:]}",) if form.annotation is bool else (dashed,)
    text = "; ".join(part for part in (field.description, form.hint) if part)
    return _Option(param=f"{prefix}{name}", decls=decls, stage=stage, field=name, annotation=form.annotation,
                   default=_cli_default(field), help=text, convert=form.convert, panel=panel, metavar=form.metavar)


def _alias(stage: str, alias: Alias, model: type[StageConfig]) -> _Option:
    field = model.model_fields[alias.field]
    param = "alias_" + alias.name.lstrip("-").replace("-", "_")
    if alias.negates:
        return _Option(param=param, decls=(alias.name,), stage=stage, field=alias.field, annotation=bool,
                       default=False, help="", convert=lambda value, option: not value, hidden=True)
    form = _cli_form(field)
    decls = (f"{alias.name}/--no-{alias.name[2:]}",) if form.annotation is bool else (alias.name,)
    return _Option(param=param, decls=decls, stage=stage, field=alias.field, annotation=form.annotation,
                   default=_cli_default(field), help="", convert=form.convert, hidden=True, metavar=form.metavar)


def stage_options(stage: str, aliases: tuple[Alias, ...] = ()) -> list[_Option]:
    """A stage command's options: every field of the stage's config, then the hidden aliases."""
    model = PipelineConfig.stage_model(stage)
    fields = [_option(stage, name, field, "", None) for name, field in model.model_fields.items()]
    return fields + [_alias(stage, alias, model) for alias in aliases]


def pipeline_options(aliases: tuple[Alias, ...] = ()) -> list[_Option]:
    """run/archive options: every field of every stage as ``--<stage>-<field>``, in a help panel per stage."""
    options = []
    for stage in PipelineConfig.model_fields:
        model = PipelineConfig.stage_model(stage)
        panel = f"{stage} stage (the config's {stage} section)"
        options += [_option(stage, name, field, f"{stage}_", panel) for name, field in model.model_fields.items()]
    return options + [_alias(alias.stage, alias, PipelineConfig.stage_model(alias.stage)) for alias in aliases]


# --- a command whose options are generated -------------------------------------------------------------------


def _typed(ctx: typer.Context, option: _Option) -> bool:
    """Whether the user gave ``option`` (an option left at its default must not override a config file)."""
    source = ctx.get_parameter_source(option.param)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


@dataclass(frozen=True)
class ConfigOptions:
    """The generated options of one command and how their values become its config.

    ``stage``: a stage command (its config is that stage's) or None for run/archive (a PipelineConfig).
    ``adjust(values)`` may change the typed values (field -> value) of a stage command before validation.
    """

    stage: str | None
    options: tuple[_Option, ...]
    adjust: Callable[[dict[str, Any]], None] | None = None

    def config(self, ctx: typer.Context, values: dict[str, Any]) -> StageConfig | PipelineConfig:
        """The config from ``--config`` and the options the user typed; their parameters are taken from ``values``."""
        config_file = values.pop("config_file", None)
        typed, names = {}, {}
        # aliases first, so an option under its field's own name wins over an older name for the field
        for option in sorted(self.options, key=lambda option: not option.hidden):
            value = values.pop(option.param)
            if _typed(ctx, option):
                typed[(option.stage, option.field)] = option.convert(value, option.name)
                names[(option.stage, option.field)] = option.name
        if self.stage is None:
            return _pipeline_config(config_file, typed, names, self.options)
        fields = {field: value for (_, field), value in typed.items()}
        if self.adjust:
            self.adjust(fields)
        return _stage_config(self.stage, config_file, fields, names, self.options)


def with_config_options(stage: str | None, aliases: tuple[Alias, ...] = (),
                        adjust: Callable[[dict[str, Any]], None] | None = None) -> Callable[[Callable], Callable]:
    """Give a command one option per config field plus ``--config FILE``; it receives the result as ``config``.

    ``stage``: a stage command (``config`` is that stage's config) or None for run/archive (``config`` is a
    PipelineConfig). ``adjust(values)`` may change a stage command's typed values before they are validated.
    """
    spec = ConfigOptions(stage, tuple(stage_options(stage, aliases) if stage else pipeline_options(aliases)), adjust)
    file_help = STAGE_FILE_HELP.format(stage=stage) if stage else PIPELINE_FILE_HELP

    def decorate(body: Callable) -> Callable:
        fixed = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                 for name, parameter in inspect.signature(body, eval_str=True).parameters.items() if name != "config"]
        config_file = inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[Optional[Path], typer.Option(
                                            "--config", help=file_help, metavar="FILE")])
        context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)

        def command(ctx: typer.Context, **values: Any) -> Any:
            config = spec.config(ctx, values)
            return body(**values, config=config)

        command.__signature__ = inspect.Signature(
            [context, *fixed, config_file, *(option.parameter() for option in spec.options)])
        command.__name__, command.__qualname__, command.__doc__ = body.__name__, body.__qualname__, body.__doc__
        command.__module__ = body.__module__
        command.config_options = spec  # read by tests, which parse a command line without running the stage
        return command

    return decorate


def _stage_config(stage: str, path: Path | None, fields: dict[str, Any], names: dict,
                  options: tuple[_Option, ...]) -> StageConfig:
    base = PipelineConfig.stage_from_file(path, stage) if path else PipelineConfig.stage_model(stage)()
    return _validated(type(base), {**base.model_dump(), **fields}, f"{stage} option",
                      lambda loc: _option_name(names, options, stage, loc))


def _pipeline_config(path: Path | None, typed: dict, names: dict, options: tuple[_Option, ...]) -> PipelineConfig:
    data = (PipelineConfig.from_file(path) if path else PipelineConfig()).model_dump()
    for (stage, field), value in typed.items():
        data[stage][field] = value
    return _validated(PipelineConfig, data, "option", lambda loc: _option_name(names, options, loc[0], loc[1:]))


def _option_name(names: dict, options: tuple[_Option, ...], stage: str, loc: tuple) -> str:
    """The option behind a pydantic error location: the one typed, else the field's generated option."""
    field = str(loc[0]) if loc else ""
    if (stage, field) in names:
        return names[(stage, field)]
    generated = [o.name for o in options if (o.stage, o.field) == (stage, field) and not o.hidden]
    return generated[0] if generated else "--" + field.replace("_", "-")


def _validated(model: type[BaseModel], data: dict, what: str, name: Callable[[tuple], str]) -> Any:
    """``model`` from the merged values; pydantic's complaints become one line naming each --option."""
    try:
        return model.model_validate(data)
    except ValidationError as error:  # its messages name the field and the allowed values
        raise PipelineError(f"invalid {what}: {problems(error, name)}") from None
