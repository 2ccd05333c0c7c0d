"""The leaf fields of a config dataclass, walked recursively (the config-metadata tests read them)."""
import dataclasses
import typing


def leaf_fields(section_cls, prefix=""):
    """(dotted key, type hint, dataclasses.Field) of every non-section field of `section_cls`, recursively."""
    hints = typing.get_type_hints(section_cls)
    for field in dataclasses.fields(section_cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            yield from leaf_fields(hint, f"{prefix}{field.name}.")
        else:
            yield prefix + field.name, hint, field
