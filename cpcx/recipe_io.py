"""Reading a recipe file into a ``Recipe``: YAML, environment interpolation, overrides, clear errors.

Every problem a user can cause ends in ``RecipeError``, whose ``lines`` say, one per problem,
``<file>: <dotted.field>: <what is wrong and the fix>``. The CLI prints them and exits with code 2.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from cpcx.errors import CpcxError

_UNION_BRANCH = re.compile(r"^(int|float|str|bool|none|bytes)$|\[")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class RecipeError(CpcxError):
    """A recipe that cannot be used; ``lines`` holds one message per problem (exit code 2)."""

    code = 2

    def __init__(self, lines: Sequence[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


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
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip().split("."), value))
    if errors:
        raise RecipeError(errors)
    return parsed


def apply_overrides(data: dict, overrides: list[tuple[list[str], Any]]) -> dict:
    for keys, value in overrides:
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
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
        else:
            got = f" (got {_describe(item['input'])})" if "input" in item and not isinstance(item["input"], dict) else ""
            lines.append(f"{source}: {dotted}: {msg[0].lower() + msg[1:]}{got}")
    return lines


# -------------------------------------------------------------------------------------------- entry
def read_yaml(path: Path) -> dict:
    source = str(path)
    if not path.is_file():
        raise RecipeError([f"{source}: file not found; pass an existing recipe, e.g. -r recipes/voc-mini.yaml"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"{source}: {where}YAML syntax error: {problem}"]) from None
    except UnicodeDecodeError:
        raise RecipeError([f"{source}: not UTF-8 text; save the recipe as UTF-8"]) from None
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
        return Recipe.model_validate(data, context={"base_dir": path.resolve().parent, "check_inputs": check_inputs})
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, Recipe, str(path), sources)) from None


def dump_recipe(recipe) -> str:
    """The resolved recipe as YAML (what ``cpcx show`` prints and every run folder keeps)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
