"""``train_mnist.py``'s command line, generated from :class:`TrainConfig`'s field metadata.

The options, their defaults, their help and docs/TRAINING.md's option table all come from
the :class:`~capsnet.training.config.Setting` of each field; ``python -m
capsnet.training.cli`` prints the table for the docs.

Every config option's argparse default is ``SUPPRESS``, so the parsed namespace holds only
the options given on the command line: a new run applies them to the defaults, a resumed
run to the checkpoint's saved settings.
"""

from __future__ import annotations

import argparse
from typing import Any

from capsnet.datasets import get_dataset
from capsnet.training.config import GROUPS, Setting, TrainConfig, config_settings
from capsnet.training.errors import ConfigError

PROGRAM = "train_mnist.py"
DESCRIPTION = (
    "Train CapsNet (Sabour, Frosst & Hinton, 2017) with fused dynamic routing; evaluate, "
    "resume and checkpoint it. See docs/TRAINING.md."
)
_DEFAULTS = TrainConfig()

# Options that choose what the program does rather than how a run is configured.
ACTION_OPTIONS = (
    ("--resume", "CHECKPOINT", "continue the run saved in CHECKPOINT (its settings, its directory)"),
    ("--eval", "CHECKPOINT", "only evaluate CHECKPOINT on the test set (or --eval-set)"),
    (
        "--eval-set",
        "SET",
        "with --eval: the set to evaluate on, test (default) or another evaluation set of the "
        "checkpoint's data set (affine: expanded-mnist's affNIST-like set, Sec. 5.2)",
    ),
)
OVERWRITE_HELP = (
    "start a new run in an --out-dir that holds an earlier run: its files are deleted first "
    "(refused otherwise)"
)


def default_text(path: str, setting: Setting) -> str:
    """The default of config field ``path`` as the help and the docs show it."""
    if setting.default_text is not None:
        return setting.default_text
    value = _DEFAULTS.lookup(path)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=DESCRIPTION)
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for path, setting in config_settings().items():
        help_text = f"{setting.help} (default: {default_text(path, setting)})"
        options: dict[str, Any] = {"dest": path, "default": argparse.SUPPRESS, "help": help_text}
        default = _DEFAULTS.lookup(path)
        if isinstance(default, bool):
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = setting.value_type or type(default)
            if setting.allowed() is not None:
                options["choices"] = setting.allowed()
            else:
                options["metavar"] = setting.metavar or setting.flag.removeprefix("--").upper()
        groups[setting.group].add_argument(setting.flag, **options)
    run = groups["run"]
    for flag, metavar, help_text in ACTION_OPTIONS:
        run.add_argument(flag, metavar=metavar, default=None, help=help_text)
    run.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parser


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The config options given on the command line, by field path."""
    paths = config_settings()
    return {name: value for name, value in vars(args).items() if name in paths}


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """The run's TrainConfig: ``base`` (the defaults for a new run, the saved settings for a
    resumed one) with the options given on the command line applied.

    Raises:
        ConfigError: naming the option (``--lr``), not the field.
    """
    values = (base or _DEFAULTS).to_dict()
    given = given_settings(args)
    dataset = given.get("dataset", values["dataset"])
    for path, value in given.items():
        if path == "model.input_shape":  # --image-size S: S x S with the data set's channels
            value = [_channels(dataset), value, value]
        if path.startswith("model."):
            values["model"][path.removeprefix("model.")] = value
        else:
            values[path] = value
    if "dataset" in given and "model.input_shape" not in given and base is None:
        values["model"]["input_shape"] = list(_native_shape(dataset))
    try:
        return TrainConfig.from_dict(values)
    except ConfigError as error:
        raise option_error(error) from None


def option_error(error: ConfigError) -> ConfigError:
    """``error`` with the field replaced by its command-line option, where it has one."""
    setting = config_settings().get(error.field)
    if setting is None:
        return error
    return ConfigError(error.field, error.reason, option=setting.flag)


def _channels(dataset: str) -> int:
    return _native_shape(dataset)[0]


def _native_shape(dataset: str) -> tuple[int, int, int]:
    try:
        return get_dataset(dataset).image_shape
    except ValueError:
        return _DEFAULTS.model.input_shape  # the config check names the unknown data set


def options_table() -> str:
    """docs/TRAINING.md's option table (Markdown), from the same settings as the parser."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for group in GROUPS:
        for path, setting in config_settings().items():
            if setting.group != group:
                continue
            flag = setting.flag
            if isinstance(_DEFAULTS.lookup(path), bool):
                shown = f"`{flag}`, `--no-{flag.removeprefix('--')}`"
            elif setting.metavar:
                shown = f"`{flag} {setting.metavar}`"
            else:
                shown = f"`{flag}`"
            choices = setting.allowed()
            listed = choices and not all(choice in setting.help for choice in choices)
            meaning = setting.help + (f" ({', '.join(choices)})" if listed else "")
            rows.append(f"| {shown} | {default_text(path, setting)} | {meaning} |")
    for flag, metavar, help_text in ACTION_OPTIONS:
        rows.append(f"| `{flag} {metavar}` | | {help_text} |")
    rows.append(f"| `--overwrite` | off | {OVERWRITE_HELP} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(options_table())
