"""Value types of the recipe schema: paths checked for what they are, and guards for numbers.

Paths: relative ones resolve against the recipe's folder; each check says what the path *is* when it is the
wrong kind (a file given for a folder, a folder or /dev/null for a file) rather than "does not exist", and a
path that cannot be looked at (permissions, a name too long, ``~nosuchuser``) is a message, not an OSError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationInfo, field_validator, \
    model_validator


def _not_empty(value: object) -> object:
    # Path("") is Path("."): an empty `root:` or `root=` would silently mean the recipe's own folder
    if isinstance(value, str) and not value.strip():
        raise ValueError("is empty; write the path (. for the recipe's folder)")
    return value


def resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the recipe file's folder (given in the validation context)."""
    try:
        value = Path(value).expanduser()
    except RuntimeError:  # '~nosuchuser/data'
        user = str(value).split("/")[0]
        raise ValueError(f"cannot expand {user!r}: no such user's home; write the full path") from None
    if value.is_absolute():
        return value
    base = Path((info.context or {}).get("base_dir", "."))
    return (base / value).resolve()


def _kind(value: Path) -> str:
    """'dir', 'file', 'other' (a device, a FIFO) or 'missing'; a path that cannot be looked at is a ValueError
    (is_dir() raises PermissionError or 'File name too long' instead of answering)."""
    import stat

    try:
        mode = value.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        raise ValueError(f"cannot look at {value} ({exc.strerror or exc}); fix the path or its permissions") from None
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _inputs_checked(info: ValidationInfo) -> bool:
    """False for commands that read none of the recipe's input files (``cpcx predict``/``export`` need only
    the segment checkpoint), so that a recipe whose data root or weights are elsewhere still loads."""
    return (info.context or {}).get("check_inputs", True)


def _must_be_dir(value: Path, info: ValidationInfo) -> Path:
    if not _inputs_checked(info):
        return value
    kind = _kind(value)
    if kind == "file":  # "does not exist" would send the user looking for a typo
        raise ValueError(f"{value} is a file, not a folder; point it at the folder that holds the data set")
    if kind == "other":
        raise ValueError(f"{value} is a device or pipe, not a folder; point it at the folder that holds the data set")
    if kind == "missing":
        raise ValueError(f"folder {value} does not exist; fix the path")
    return value


def _wrong_kind_for_file(value: Path, what: str) -> str | None:
    kind = _kind(value)
    if kind == "dir":
        return f"{value} is a folder, not {what}; name the file itself"
    if kind == "other":
        return f"{value} is not a regular file (a device or pipe); name the file itself"
    return None if kind == "file" else ""


def must_be_file(value: Path, info: ValidationInfo) -> Path:
    if not _inputs_checked(info):
        return value
    problem = _wrong_kind_for_file(value, "a file")
    if problem == "":
        raise ValueError(f"file {value} does not exist; fix the path")
    if problem:
        raise ValueError(problem)
    return value


def _must_be_weights(value: Path, info: ValidationInfo) -> Path:
    if not _inputs_checked(info):
        return value
    problem = _wrong_kind_for_file(value, "a weights file")
    if problem == "":
        raise ValueError(
            f"weights file {value} does not exist; fix the path, or build it offline with "
            "`cpcx weights import dinov2-vits14|efficientnet-lite0 --out <file>` (or `make weights`)"
        )
    if problem:
        raise ValueError(problem.replace("name the file itself", "name the .safetensors file itself"))
    return value


_PATH = (BeforeValidator(_not_empty), AfterValidator(resolve_path))
RecipePath = Annotated[Path, *_PATH]
WeightsFile = Annotated[Path, *_PATH, AfterValidator(_must_be_weights)]
ExistingDir = Annotated[Path, *_PATH, AfterValidator(_must_be_dir)]
ExistingFile = Annotated[Path, *_PATH, AfterValidator(must_be_file)]


# ---------------------------------------------------------------------------------------------- numbers
class NotANumber:
    """Stands for a YAML boolean found in a number field: no number type accepts it, its repr is the YAML."""

    def __init__(self, value: bool):
        self.value = value

    def __repr__(self) -> str:
        return str(self.value).lower()


def numeric(annotation: object) -> bool:
    from typing import get_args

    args = get_args(annotation) or (annotation,)
    return any(a in (int, float) for a in args) and bool not in args


Device = str  # "auto", "cpu", "cuda", "cuda:1" — checked where the device is opened, with a clear message.
Precision = Literal["auto", "bf16", "fp32"]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are checked on assignment too."""

    # allow_inf_nan=False: a NaN or inf (YAML .nan/.inf, 1e999) passes every ge/gt bound of pydantic and
    # only fails mid-training; no field of a recipe means either
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: object) -> object:
        # pydantic's lax mode reads `epochs: true` as 1: a YAML boolean in a number field is a mistake. The
        # boolean becomes a marker that no number type accepts, so pydantic reports it on the field itself
        # ("input should be a valid integer (got true)"); a field validator cannot, as "*" would include the
        # discriminator fields, where pydantic forbids before-validators.
        if isinstance(data, dict):
            data = {k: NotANumber(v) if isinstance(v, bool) and k in cls.model_fields
                    and numeric(cls.model_fields[k].annotation) else v for k, v in data.items()}
        return data

    @field_validator("*")
    @classmethod
    def _int_fits(cls, value: object, info: ValidationInfo) -> object:
        # a count past 2**31 (`epochs: 1e30` written as digits) validates, then overflows in torch or numpy
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**31 \
                and not (cls.__name__ == "Recipe" and info.field_name == "seed"):  # that one has its own bound
            raise ValueError(f"{value} is too large; the most this field takes is {2**31 - 1}")
        return value
