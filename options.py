"""options.py: the command lines' shared pieces. An option of `python train.py` is declared once, as
the field of the configuration that it sets:

    candidates: int = option(20, "AR N-best candidates per source (E-step)", minimum=1)

is the field EMConfig.candidates, default 20, and the option --candidates: its type the field's
(int), its help the text, its default shown by --help. add_options builds the parser's groups from
such fields, values reads them back from the parsed command line, check_minimums refuses a count
that is too small in one line that names the option. Both command lines (train.py, decode.py) show
their help with HelpFormatter.
"""
import argparse
from dataclasses import field, fields, is_dataclass

SAME = object()                   # an option whose command-line default is its field's


def option(default, help, *, cli_default=SAME, flag=None, group=None, minimum=None, **keywords):
    """A dataclass field that is also a command-line option.

    default: the field's default; cli_default: the command line's, where it differs (None where the
    value is decided once every option is read, e.g. "the preset's"); flag: the option's name when
    it is not --<field-name>; group: the --help group, when not that of the field's configuration;
    minimum: the smallest value allowed (None is always allowed); keywords: more of argparse's
    add_argument (choices, metavar, nargs, type where the field's own does not convert the text).
    """
    spec = dict(help=help, cli_default=default if cli_default is SAME else cli_default, flag=flag,
                group=group, minimum=minimum, keywords=keywords)
    return field(default=default, metadata={"option": spec})


def option_fields(config_class):
    """The fields of a configuration that are options, with their option's spec."""
    return [(f, f.metadata["option"]) for f in fields(config_class) if "option" in f.metadata]


def options_within(config_class):
    """(configuration class, field, spec) of every option of a configuration and of the
    configurations nested in it, in field order."""
    for f in fields(config_class):
        if "option" in f.metadata:
            yield config_class, f, f.metadata["option"]
        elif is_dataclass(f.type):
            yield from options_within(f.type)


def flag_of(f, spec):
    return spec["flag"] or "--" + f.name.replace("_", "-")


def add_options(parser, groups, *configs):
    """Every option of `configs` (dataclasses, nested ones included) into `parser`. groups: (title,
    configuration classes...) in the order --help shows them; an option goes to the group of its
    configuration unless it names another."""
    group_of = {cls: title for title, *classes in groups for cls in classes}
    shown = {title: parser.add_argument_group(title) for title, *_ in groups}
    for config in configs:
        for owner, f, spec in options_within(config):
            shown[spec["group"] or group_of[owner]].add_argument(
                flag_of(f, spec), dest=f.name, default=spec["cli_default"], help=spec["help"],
                **argparse_keywords(f, spec))


def argparse_keywords(f, spec):
    """The field's type says how the option reads its text: a bool is a switch, an int or a float
    converts it; the declaration's own keywords (type=, action=) take precedence."""
    keywords = dict(spec["keywords"])
    if f.type is bool:
        keywords.setdefault("action", "store_true")
    elif f.type in (int, float):
        keywords.setdefault("type", f.type)
    return keywords


def values(config_class, args, **decided):
    """The option values of one configuration class from the parsed command line, as keyword
    arguments for it; `decided` replaces some (values that depend on other options)."""
    return {**{f.name: getattr(args, f.name) for f, _ in option_fields(config_class)}, **decided}


def check_minimums(args, *configs):
    """Each option with a minimum: a value below it is refused in one line naming the option."""
    for config in configs:
        for _, f, spec in options_within(config):
            value = getattr(args, f.name)
            if spec["minimum"] is not None and value is not None and value < spec["minimum"]:
                bound = "0 or more" if spec["minimum"] == 0 else f"at least {spec['minimum']}"
                raise ValueError(f"{flag_of(f, spec)} must be {bound}, not {value}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default except the absent ones (None: those say in words where they come
    from) and a switch's False; the description and the examples keep their line breaks."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)
