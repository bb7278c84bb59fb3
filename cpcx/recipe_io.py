"""Reading a recipe file into a ``Recipe``: YAML, environment interpolation, overrides, clear errors.

Every problem a user can cause ends in ``RecipeError``, whose ``lines`` say, one per problem,
``<file>: <dotted.field>: <what is wrong and the fix>``. The CLI prints them and exits with code 2.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from cpcx.errors import RecipeError
from cpcx.recipe_yaml import MAX_BYTES, load_yaml_text

_UNION_BRANCH = re.compile(r"^(int|float|str|bool|none|bytes)$|\[")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# ------------------------------------------------------------------------------------ interpolation
def _interpolate(node: Any, where: str, errors: list[str], env: dict[str, str], sources: dict[str, list[str]]) -> Any:
    """Replace ``${VAR}``/``${VAR:-default}``; ``sources`` records which variables fed which field."""
    if isinstance(node, dict):
        return {
            k: _interpolate(v, f"{where}.{k}" if where else str(k), errors, env, sources) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_interpolate(v, f"{where}.{i}", errors, env, sources) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        sources.setdefault(where, []).append(name)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        errors.append(f"{where}: environment variable {name} is not set; export it or write ${{{name}:-default}}")
        return ""

    return _VAR.sub(substitute, node)


# ---------------------------------------------------------------------------------------- overrides
def parse_overrides(items: Iterable[str]) -> list[tuple[list[str], Any]]:
    """``model.topk=8`` → (["model", "topk"], 8); values are parsed as YAML scalars/flow collections."""
    parsed, errors = [], []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.split(".")):
            errors.append(f"override '{item}': expected key=value with a dotted key, e.g. train.epochs=5")
            continue
        # the recipe's loader, not yaml.safe_load: an override value is as hostile as a recipe (alias bombs)
        value = load_yaml_text(raw, f"override '{item}'", syntax_errors=False) if raw.strip() else ""
        parsed.append((key.strip().split("."), value))
    if errors:
        raise RecipeError(errors)
    return parsed


def _schema_field(keys: Sequence[str]) -> Any:
    """The pydantic field that the dotted ``keys`` name in the Recipe schema (any branch of a union), or None."""
    from cpcx.recipe import Recipe

    models: list[type[BaseModel]] = [Recipe]
    field = None
    for key in keys:
        field = next((m.model_fields[key] for m in models if key in m.model_fields), None)
        if field is None:
            return None
        models = [a for a in _flatten(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return field


def _list_override_error(keys: list[str], depth: int, current: Any, value: Any) -> RecipeError:
    """``train.views.1=vflip``: say that a list is overridden whole, with the list this override meant."""
    prefix = ".".join(keys[: depth + 1])
    if not isinstance(current, list):
        field = _schema_field(keys[: depth + 1])
        default = field.get_default(call_default_factory=True) if field is not None else None
        current = list(default) if isinstance(default, (list, tuple)) else []
    example = list(current)
    index = keys[depth + 1]
    if depth + 2 == len(keys) and index.isdigit() and int(index) <= len(example):
        example[int(index): int(index) + 1] = [value]
    if not example:
        example = ["..."]
    shown = "[" + ",".join(str(v) for v in example) + "]"
    given = value if isinstance(value, (str, int, float, bool)) else "..."
    return RecipeError([f"override '{'.'.join(keys)}={given}': {prefix} is a list, so its items have no keys; "
                        f"override the whole list, e.g. {prefix}={shown}"])


def _is_list_field(keys: list[str]) -> bool:
    """Whether the schema field at ``keys`` is a list or tuple (``train.views``, ``segment.scales``)."""
    field = _schema_field(keys)
    if field is None:
        return False
    annotation = field.annotation
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":  # Optional[list[...]]
        annotation = next((a for a in get_args(annotation) if a is not type(None)), annotation)
    return get_origin(annotation) in (list, tuple)


def apply_overrides(data: dict, overrides: list[tuple[list[str], Any]]) -> dict:
    for keys, value in overrides:
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if isinstance(child, list) or (child is None and _is_list_field(keys[: depth + 1])):
                raise _list_override_error(keys, depth, child, value)
            if not isinstance(child, dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return data


# ------------------------------------------------------------------------------------- error lines
def _model_at(model: type[BaseModel], loc: Sequence[Any]) -> tuple[type[BaseModel] | None, list[str]]:
    """Walk ``loc`` through nested models; return the model holding the last key and the clean path."""
    from typing import get_args

    path: list[str] = []
    current: Any = model
    for i, part in enumerate(loc[:-1]):
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None, path + [str(p) for p in loc[i:]]
        field = current.model_fields.get(str(part))
        if field is None:
            return None, path + [str(p) for p in loc[i:]]
        path.append(str(part))
        annotation = field.annotation
        candidates = [a for a in _flatten(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(candidates) > 1:  # a discriminated union: pydantic puts the tag next in loc
            tag = loc[i + 1] if i + 1 < len(loc) else None
            chosen = [c for c in candidates if _tag_of(c) == tag]
            if chosen:
                loc = list(loc[: i + 1]) + list(loc[i + 2 :])
                return _model_at_rest(chosen[0], loc[i + 1 :], path)
            return None, path + [str(p) for p in loc[i + 1 :]]
        current = candidates[0] if candidates else get_args(annotation)
    return (current if isinstance(current, type) and issubclass(current, BaseModel) else None), path + [str(loc[-1])]


def _model_at_rest(model: type[BaseModel], rest: Sequence[Any], path: list[str]):
    sub_model, sub_path = _model_at(model, rest) if rest else (model, [])
    return sub_model, path + sub_path


def _flatten(annotation: Any) -> list[Any]:
    from typing import get_args

    args = get_args(annotation)
    if not args:
        return [annotation]
    out: list[Any] = []
    for arg in args:
        out.extend(_flatten(arg))
    return out


def _tag_of(model: type[BaseModel]) -> Any:
    for name in ("kind", "provider"):
        field = model.model_fields.get(name)
        if field is not None:
            return field.default
    return None


def _invisible(text: str) -> str:
    """The first invisible or control character of ``text`` as U+XXXX (zero-width space, BOM, bidi marks), or ''."""
    import unicodedata

    for char in text:
        if unicodedata.category(char) in ("Cf", "Cc", "Co", "Cn") or (char.isspace() and char != " "):
            return f"U+{ord(char):04X}"
    return ""


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_validation_error(
    error: ValidationError, root_model: type[BaseModel], source: str, env_sources: dict[str, list[str]] | None = None
) -> list[str]:
    lines: list[str] = []
    env_sources = env_sources or {}
    seen: set[str] = set()
    for item in error.errors():
        # pydantic names the branch of a plain union in loc ('topk', 'int'): drop it, report the field once
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and _UNION_BRANCH.search(p)))
        kind, msg = item["type"], item["msg"]
        key = ".".join(map(str, loc))
        if key in seen:
            continue
        seen.add(key)
        holder, path = _model_at(root_model, loc) if loc else (root_model, [])
        dotted = ".".join(path) or "(top level)"
        if kind == "extra_forbidden":
            known = list(holder.model_fields) if holder else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else (f"; known keys: {', '.join(known)}" if known else "")
            hidden = _invisible(str(loc[-1]))
            if hidden:  # 'na\u200bme' prints as 'name': the user would see "name: unknown key" and be lost
                dotted = ".".join(path[:-1] + [ascii(str(loc[-1]))])
                hint = f" (it holds the invisible character {hidden}; retype it){hint}"
            lines.append(f"{source}: {dotted}: unknown key{hint}")
        elif kind == "missing":
            lines.append(f"{source}: {dotted}: required field is missing; add it to the recipe")
        elif kind in ("union_tag_not_found", "union_tag_invalid"):
            ctx = item.get("ctx", {})
            tag = ctx.get("discriminator", "").strip("'")
            field = holder.model_fields.get(str(loc[-1])) if holder else None
            tags = [_tag_of(m) for m in _flatten(field.annotation) if isinstance(m, type)] if field else []
            expected = ", ".join(repr(t) for t in tags if t is not None) or ctx.get("expected_tags", "")
            got = f" (got {_describe(ctx.get('tag'))})" if kind == "union_tag_invalid" else ""
            lines.append(f"{source}: {dotted}.{tag}: must be one of {expected}{got}")
        elif kind == "value_error":
            text = msg.removeprefix("Value error, ")
            names = env_sources.get(dotted)
            if names:  # say which environment variable produced the bad value
                text += f" or set ${names[0]}"
            lines.append(f"{source}: {dotted}: {text}")
        elif kind in ("model_type", "model_attributes_type"):  # pydantic's text names a class: say what it means
            given = item.get("input")
            what = "is empty" if given is None else f"must be a section of key: value settings (got {_describe(given)})"
            field = holder.model_fields.get(str(loc[-1])) if holder else None
            optional = ", or remove it" if field is not None and not field.is_required() else ""
            lines.append(f"{source}: {dotted}: {what}; write e.g. '{dotted}: {{...}}' with its keys{optional}")
        elif kind == "invalid_key":  # YAML 1.1 reads `on:`/`yes:` as true, `~:`/`null:` as null, `1:` as a number
            where = ".".join(path[:-1]) or "(top level)"
            lines.append(f"{source}: {where}: the key {_describe(item.get('input'))} is not a name (YAML reads on, "
                         "yes, no, off, ~, null and numbers as values); quote it or fix the spelling")
        elif kind == "path_type":  # pydantic says "input is not a valid path for <class 'pathlib.Path'>"
            lines.append(f"{source}: {dotted}: must be a path written as text (got {_describe(item['input'])})")
        else:
            got = f" (got {_describe(item['input'])})" if "input" in item and not isinstance(item["input"], dict) else ""
            if kind == "string_type" and not isinstance(item.get("input"), (dict, list, type(None))):
                got += "; put the value in quotes"  # YAML read `name: 2024-01-01` as a date, `model: 7` as a number
            lines.append(f"{source}: {dotted}: {msg[0].lower() + msg[1:]}{got}")
    return lines


# -------------------------------------------------------------------------------------------- entry
def read_yaml(path: Path) -> dict:
    source = str(path)
    if not path.exists():
        raise RecipeError([f"{source}: file not found; pass an existing recipe, e.g. -r recipes/voc-mini.yaml"])
    if not path.is_file():  # a folder, /dev/zero, a FIFO: reading them would fail late, hang or never end
        what = "a folder" if path.is_dir() else "not a regular file"
        raise RecipeError([f"{source}: is {what}; pass a recipe YAML file, e.g. -r recipes/voc-mini.yaml"])
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise RecipeError([f"{source}: cannot read ({exc.strerror or exc}); check the file's permissions"]) from None
    if len(raw) > MAX_BYTES:
        raise RecipeError([f"{source}: larger than {MAX_BYTES >> 10} KiB, too large for a recipe; pass the recipe "
                           "YAML file (recipes are a few KB)"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError([f"{source}: not UTF-8 text; save the recipe as UTF-8"]) from None
    data = load_yaml_text(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{source}: the recipe must be a mapping of sections (name:, dataset:, ...), got {type(data).__name__}"])
    return data


def load_recipe(path: str | Path, overrides: Iterable[str] = (), env: dict[str, str] | None = None,
                check_inputs: bool = True):
    """Read, interpolate, override and validate a recipe. Raises ``RecipeError``.

    ``check_inputs=False`` skips the existence checks of the data root and the input files (weights, prompts)
    for commands that read none of them (``cpcx predict``, ``cpcx export``)."""
    from cpcx.recipe import Recipe

    path = Path(path)
    parsed_overrides = parse_overrides(overrides)
    data = read_yaml(path)
    errors: list[str] = []
    sources: dict[str, list[str]] = {}
    data = _interpolate(data, "", errors, dict(os.environ if env is None else env), sources)
    if errors:
        raise RecipeError([f"{path}: {line}" for line in errors])
    data = apply_overrides(data, parsed_overrides)
    try:
        recipe = Recipe.model_validate(data, context={"base_dir": path.resolve().parent,
                                                           "check_inputs": check_inputs})
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, Recipe, str(path), sources)) from None
    key_env = getattr(recipe.llm, "api_key_env", None)
    if key_env:  # its value is a secret whatever the variable is called: keep it out of crash logs
        from cpcx.crashlog import register_secret_env

        register_secret_env(key_env)
    return recipe


def dump_recipe(recipe) -> str:
    """The resolved recipe as YAML (what ``cpcx show`` prints and every run folder keeps)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
