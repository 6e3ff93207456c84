"""Config files: loading with `_base_` inheritance, dotted overrides, and strict validation.

The paper code's schema: top-level keys (`train_dataloader`, `encoder`, `loss`, `trainer`, ...)
with `{type, args}` blocks resolved through `utils.registry`. Everything is checked before anything
is built: an unknown key or type, or a wrongly typed value, is a `ConfigError` naming the key path
(`loss.args.topk_neg`) and, for types, the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from utils.registry import Registry

BASE_KEY = "_base_"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key path."""


# ----------------------------------------------------------------------------- loading


class ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader that also reads `1e-6` as a number (YAML 1.1 wants `1.0e-6`)."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_yaml(path: str | Path) -> dict:
    """Read one YAML file that must hold a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=ConfigLoader)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    """Return `base` updated by `update`: mappings merge key by key, anything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Load a config file, resolving `_base_` (a path or a list of paths, relative to the file).

    Later bases override earlier ones and the file itself overrides all of its bases.
    """
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: `_base_` inheritance loops back to this file")
    data = read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: `{BASE_KEY}` must be a path or a list of paths")
    merged: dict = {}
    for base in bases:
        merged = deep_merge(merged, load_config(path.parent / base, _seen + (path.resolve(),)))
    return deep_merge(merged, data)


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply `dotted.path=value` overrides; values are parsed as YAML (`a.b=[1, 2]`, `x=null`).

    A list element is addressed by its index (`valid_dataloader.0.args.batch_size=64`). Missing
    mappings on the way are created; whether the key is allowed is for validation to say.
    """
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        set_by_path(config, key.split("."), parse_value(raw))
    return config


def parse_value(raw: str) -> Any:
    """A command-line value, read as YAML (`[1, 2]`, `null`, `1e-5`)."""
    return yaml.load(raw, Loader=ConfigLoader) if raw else None


def set_by_path(tree: dict, keys: list[str], value: Any) -> None:
    """Set `tree[k0][k1]...[kn] = value`; integer keys index lists."""
    node: Any = tree
    for depth, key in enumerate(keys[:-1]):
        node = _child(node, key, keys[: depth + 1])
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, keys)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{'.'.join(keys[:-1])}: cannot set '{last}' inside a {type(node).__name__}")


def _child(node: Any, key: str, path: list[str]) -> Any:
    """`node[key]`, made an empty mapping when absent or null."""
    if isinstance(node, list):
        return node[_list_index(node, key, path)]
    if not isinstance(node, dict):
        raise ConfigError(f"{'.'.join(path[:-1])} is a {type(node).__name__}, not a mapping")
    if node.get(key) is None:
        node[key] = {}
    return node[key]


def _list_index(node: list, key: str, path: list[str]) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ConfigError(f"{'.'.join(path)}: '{key}' is not an index of a list of {len(node)}")
    return int(key)


# ----------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class Block:
    """Type marker for a `{type, args}` block resolved through `registry`.

    Used inside `typing.Annotated[dict, Block(REGISTRY)]` in schemas.
    """

    registry: Registry


def check_value(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against the type `hint`; return it (dataclasses come back as instances).

    Supports the built-in scalars, `Any`, `None`, `Optional`/`Union`, `Literal`, `list[T]`,
    `dict[K, V]`, dataclasses (strict: unknown keys are errors) and `Annotated[dict, Block(...)]`.
    Raises ConfigError naming `path` and what was expected.
    """
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is typing.Annotated:
        base, *meta = typing.get_args(hint)
        block = next((m for m in meta if isinstance(m, Block)), None)
        if block is not None:
            check_block(value, block.registry, path)
            return value
        return check_value(value, base, path)
    if origin in (Union, types.UnionType):
        return _check_union(value, typing.get_args(hint), path)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        (item_hint,) = typing.get_args(hint) or (Any,)
        return [check_value(v, item_hint, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        return value
    if dataclasses.is_dataclass(hint):
        return check_dataclass(value, hint, path)
    return _check_scalar(value, hint, path)


def _check_union(value: Any, options: tuple, path: str) -> Any:
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return check_value(value, option, path)
        except ConfigError as err:
            errors.append(str(err))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    raise ConfigError(f"{path}: {_describe(value)} matches none of: " + "; ".join(errors))


def _check_scalar(value: Any, hint: Any, path: str) -> Any:
    if hint is type(None) or hint is None:
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if hint in (bool, str):
        if not isinstance(value, hint):
            raise ConfigError(f"{path}: expected {hint.__name__}, got {_describe(value)}")
        return value
    raise TypeError(f"{path}: schema type {hint!r} is not supported by the config checker")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def check_dataclass(value: Any, cls: type, path: str) -> Any:
    """Build `cls` from the mapping `value`, strictly (unknown keys and wrong types are errors)."""
    if dataclasses.is_dataclass(value) and isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(value, fields, path)
    kwargs = {}
    for name, field in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in value:
            kwargs[name] = check_value(value[name], hints[name], sub)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required key is missing")
    return cls(**kwargs)


def _reject_unknown(value: dict, allowed: typing.Iterable[str], path: str) -> None:
    allowed = list(allowed)
    unknown = [k for k in value if k not in allowed]
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key; valid keys here: {', '.join(sorted(allowed))}"
        )


def check_block(block: Any, registry: Registry, path: str) -> None:
    """Check a `{type, args}` block: the type is registered and its args fit the constructor."""
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: expected a {{type, args}} block, got {_describe(block)}")
    _reject_unknown(block, ("type", "args"), path)
    name = block.get("type")
    if name not in registry:
        raise ConfigError(
            f"{path}.type: unknown {registry.kind} type {name!r}; valid types: {', '.join(registry.names())}"
        )
    args = block.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{path}.args: expected a mapping, got {_describe(args)}")
    check_arguments(registry.get(name), args, registry.runtime_args, f"{path}.args")


def check_arguments(fn: Any, args: dict, runtime_args: frozenset, path: str) -> None:
    """Check keyword arguments for `fn` (a class or function) against its annotated signature."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = {
        name: p
        for name, p in inspect.signature(target).parameters.items()
        if name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    hints = typing.get_type_hints(target, include_extras=True)
    config_params = {n: p for n, p in params.items() if n not in runtime_args}
    for name in args:
        if name in runtime_args:
            raise ConfigError(f"{path}.{name}: set by the program, not by the config")
    _reject_unknown(args, config_params, path)
    for name, param in config_params.items():
        if name in args:
            check_value(args[name], hints.get(name, Any), f"{path}.{name}")
        elif param.default is inspect.Parameter.empty:
            raise ConfigError(f"{path}.{name}: required argument is missing")


def build_block(block: dict, registry: Registry, **runtime: Any) -> Any:
    """Construct the object a checked block describes, adding the program's runtime arguments."""
    args = dict(block.get("args") or {})
    clash = sorted(set(args) & set(runtime))
    if clash:
        raise ConfigError(f"args {clash} are set by the program and may not be given in the config")
    return registry.get(block["type"])(**args, **runtime)
