"""Configs as files and dicts: YAML/JSON recipes, ``section.key=value`` overrides, the resolved
config saved beside a checkpoint (see ``aoe.config``)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from aoe.config.applicability import settle_saved
from aoe.config.schema import ConfigError
from aoe.config.sections import SECTIONS, RunConfig
from aoe.errors import one_line, shown


def _unknown_key(key: str, valid: Iterable[str], where: str) -> ConfigError:
    valid = list(valid)
    last = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(last, valid, n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys of {where}: {', '.join(valid)}")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """``{"model": {...}, "data": {...}, "train": {...}}`` of plain JSON/YAML values."""
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def config_from_dict(d: dict[str, Any] | None) -> RunConfig:
    """Build a validated ``RunConfig`` from a (possibly partial) nested dict; missing keys keep their
    defaults; unknown keys raise ``ConfigError`` naming the dotted key."""
    sections = {name: SECTIONS[name](**values) for name, values in _checked_layout(d, "a config").items()}
    return RunConfig(**sections)


def _kind(value: Any) -> str:
    """'a list', 'an integer'... for messages about a value of the wrong shape."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
    return names.get(type(value), f"a {type(value).__name__}")


def _checked_layout(d: Any, origin: str) -> dict[str, dict[str, Any]]:
    """``d`` as ``{section: {key: value}}``: a mapping (or None) of known sections, each a mapping
    (or None) of its known keys. ``origin`` starts the messages (e.g. "config file 'run.yaml'")."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{origin} must be a mapping of sections {list(SECTIONS)}, got {_kind(d)} "
                          f"({shown(d, 60)}); e.g. write 'model: {{d_model: 128}}'")
    out = {}
    for name, values in d.items():
        if name not in SECTIONS:
            raise _unknown_key(shown(name) if not isinstance(name, str) else name, SECTIONS, "the top level")
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {name!r} must be a mapping of keys to values, got {_kind(values)} "
                              f"({shown(values, 60)}); write it as '{name}: {{key: value}}' or one 'key: value' "
                              "per indented line")
        valid = _field_names(SECTIONS[name])
        for key in values:
            if key not in valid:
                raise _unknown_key(f"{name}.{key if isinstance(key, str) else shown(key)}", valid, name)
        out[name] = dict(values)
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {item!r}: the key must be section.key (e.g. model.d_model=256)")
    try:
        value = _parse_yaml(raw) if raw.strip() else None
    except ValueError as e:
        raise ConfigError(f"override {shown(item)}: cannot parse the value ({e}); write it as YAML, e.g. 3e-4, "
                          "true, null, [0, 1] or \"quoted text\"") from None
    return parts, value


_TOO_DEEP = "lists or mappings nested too deeply"
#: The deepest nesting of lists and mappings a config may have (a run config needs 3), refused
#: before the recursive constructor runs, so that the outcome does not depend on the interpreter's
#: recursion limit (which other libraries raise).
MAX_DEPTH = 64


def _check_depth(text: str) -> None:
    """Refuse ``text`` when its collections nest deeper than ``MAX_DEPTH`` (PyYAML's event parser
    is iterative: it reads any depth without recursing)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise RecursionError
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _parse_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``; any failure of the parser on this text becomes a one-line
    ``ValueError`` that says where."""
    try:
        _check_depth(text)
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark, problem = e.problem_mark, e.problem or e.context
        if mark is None or not problem:
            raise ValueError(one_line(e)) from None
        raise ValueError(f"line {mark.line + 1}, column {mark.column + 1}: {problem}") from None
    except yaml.YAMLError as e:
        raise ValueError(one_line(e)) from None
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None
    except (ValueError, TypeError, AttributeError) as e:
        # PyYAML's constructors fail this way on some malformed scalars (a date "2001-13-01", "!!int x")
        raise ValueError(f"{type(e).__name__}: {one_line(e)}") from None


def apply_overrides(d: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of the nested dict ``d`` with ``section.key=value`` overrides applied
    (unknown keys refused; values type-checked when the config is built)."""
    if isinstance(overrides, str):
        overrides = [overrides]
    out = _checked_layout(d, "a config")
    for item in overrides:
        parts, value = _parse_override(item)
        section, rest = parts[0], parts[1:]
        if section not in SECTIONS:
            raise _unknown_key(".".join(parts), SECTIONS, "the top level")
        valid = _field_names(SECTIONS[section])
        if len(rest) != 1 or rest[0] not in valid:
            raise _unknown_key(".".join(parts), valid, section)
        out.setdefault(section, {})[rest[0]] = value
    return out


def config_path(name: str) -> Path:
    """A packaged recipe's path from its name ("tiny" or "tiny.yaml")."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = Path(str(resources.files("aoe") / "configs" / f"{stem}.yaml"))
    if not path.is_file():
        raise ConfigError(f"no config file {name!r} and no packaged recipe of that name; packaged: {list_configs()}")
    return path


def list_configs() -> list[str]:
    """Names of the packaged recipes (aoe/configs/*.yaml)."""
    folder = resources.files("aoe") / "configs"
    try:
        return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
    except (FileNotFoundError, NotADirectoryError):  # pragma: no cover
        return []


def _read_text(p: Path) -> str:
    """The file's text; an unreadable or non-UTF-8 file raises ``ConfigError`` naming it."""
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
                          "save it as UTF-8") from None


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise ValueError(one_line(e)) from None


def _read_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        p = config_path(str(path))
    text = _read_text(p)
    try:
        d = _parse_json(text) if p.suffix == ".json" else _parse_yaml(text)
    except ValueError as e:
        raise ConfigError(f"cannot parse config file {str(p)!r}: {e}") from None
    return _checked_layout(d, f"config file {str(p)!r}")


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a config and apply overrides.

    Args:
        path: a YAML (or JSON) file with sections model/data/train, or the name of a packaged
            recipe (``list_configs()``, e.g. "tiny"); None = the dataclass defaults.
        overrides: ``"section.key=value"`` strings applied in order after the file; each value is
            parsed as YAML (``3``, ``3e-4``, ``true``, ``null``, ``[0, 1]``) and type-checked.

    Raises:
        ConfigError: an unknown key (named in full, with the section's valid keys), a value of the
            wrong type, or an invalid value.
    """
    d = _read_file(path) if path is not None else {}
    return config_from_dict(apply_overrides(d, overrides))


#: Model keys whose default changed, with the value a saved run config WITHOUT the key was trained
#: with: a run saved before the key existed (or before its default changed) reads as it was run.
#: gate_init: "normal" (the authors' init) was the only init, then the default, until "balanced"
#: became the default for new models (docs/results/tiny-balanced). renormalize: null (the layer's
#: default then: MoE true, AoE false; ``aoe.config.model.LEGACY_RENORMALIZE``) until AoE's
#: default became Algorithm 2's renormalized gate.
SAVED_MODEL_DEFAULTS = {"gate_init": "normal", "renormalize": None}

#: Model keys that only decide how a new model's weights start: a resumed run keeps the value it
#: was started with (its weights come from the checkpoint), whatever the config given now says.
INIT_ONLY_MODEL_KEYS = ("gate_init",)


def load_saved_config(path: str | os.PathLike) -> RunConfig:
    """Read a run config the trainer saved (a checkpoint's or a run's config.yaml): as
    ``load_config``, except that a model key of ``SAVED_MODEL_DEFAULTS`` the file lacks takes the
    value the run was trained with, not today's default, and an option that did nothing in that run
    (``aoe.config.applicability``) reads as its off value."""
    d = _read_file(path)
    model = d["model"] = d.get("model") or {}
    for key, value in SAVED_MODEL_DEFAULTS.items():
        model.setdefault(key, value)
    return config_from_dict(settle_saved(d))


def config_yaml(cfg: RunConfig) -> str:
    """The resolved config as the YAML text ``save_config`` writes."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config: JSON if the path ends in .json, else YAML. Returns the path."""
    p = Path(path)
    if p.suffix == ".json":
        text = json.dumps(config_to_dict(cfg), indent=2) + "\n"
    else:
        text = config_yaml(cfg)
    p.write_text(text, encoding="utf-8")
    return p
