"""msgpack codec for the wire schemas, with errors that say what was wrong."""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from services.common.schemas import ErrorCode, ErrorInfo

M = TypeVar("M", bound=BaseModel)


class CodecError(ValueError):
    """A payload that is not valid msgpack or does not fit its schema."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def to_error(self) -> ErrorInfo:
        """As a wire error."""
        return ErrorInfo(code=ErrorCode.INVALID_REQUEST, message=str(self), param=self.param)


def encode(msg: BaseModel) -> bytes:
    """Serialize a schema object to msgpack (None fields dropped to keep messages small)."""
    return msgpack.packb(msg.model_dump(mode="json", exclude_none=True), use_bin_type=True)


def unpack(data: bytes) -> Any:
    """Decode raw msgpack or raise CodecError."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CodecError(f"payload is not valid msgpack ({type(exc).__name__}: {exc})") from exc


def _is_type_tag(part: object) -> bool:
    # pydantic names union members in the location ("prompt.str", "stop.list[str]"); users need the field.
    return isinstance(part, str) and (part in _TYPE_TAGS or ("[" in part and part.endswith("]")))


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}


def validation_error(exc: ValidationError) -> CodecError:
    """The first pydantic error as a CodecError naming the field."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if not _is_type_tag(p))
    msg = first.get("msg", "invalid value")
    return CodecError(f"{loc}: {msg}" if loc else msg, param=loc or None)


def decode(cls: type[M], data: bytes, **overrides: Any) -> M:
    """Decode msgpack into a schema object or raise CodecError."""
    obj = unpack(data)
    if not isinstance(obj, dict):
        raise CodecError(f"payload must be a msgpack map, got {type(obj).__name__}")
    obj.update(overrides)
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        raise validation_error(exc) from exc
