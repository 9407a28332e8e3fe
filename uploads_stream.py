"""Streaming a multipart upload straight to disk, refusing it as soon as it passes the size limit."""

from __future__ import annotations

from pathlib import Path

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import Request

from disk import is_disk_full


class UploadError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


MAX_FIELDS, MAX_FIELD_BYTES = 16, 1024  # the small text fields beside the file


async def receive_file(request: Request, field: str, dest_for, max_bytes: int,
                       disk_room: int | None = None) -> tuple[Path, str, dict[str, str]]:
    """Write the multipart part named ``field`` to ``dest_for(filename)``; return (path,
    filename, the other fields: small text values such as ``fps``).

    The body is parsed while it streams in, so an oversized upload is refused after
    ``max_bytes`` have arrived instead of after all of it has been buffered; past ``disk_room``
    bytes (what the disk quota leaves) it is refused with 507. Other parts are ignored.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(415, "unsupported_media_type",
                          f"send the video as multipart/form-data with a '{field}' field")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise UploadError(413, "upload_too_large",
                          f"the upload is {int(declared)} bytes; the limit is {max_bytes} "
                          f"(SAM2_MAX_UPLOAD_MB)")
    if declared and declared.isdigit() and disk_room is not None and int(declared) > disk_room:
        raise UploadError(507, "insufficient_storage", _no_room(disk_room))

    # "out": the open file while our part streams in; "done" once it has ended.
    state: dict = {"headers": {}, "field": b"", "value": b"", "out": None, "path": None,
                   "filename": None, "size": 0, "too_big": False, "no_room": False,
                   "done": False, "text": None, "fields": {}}

    def on_part_begin():
        state["headers"] = {}

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        state["text"] = None
        if b"filename" not in disp and name != field and len(state["fields"]) < MAX_FIELDS:
            state["text"] = (name, bytearray())  # a small text field; longer ones are cut
        if name == field and state["path"] is None:
            filename = disp.get(b"filename", b"video").decode("utf-8", "replace")
            state["filename"] = filename
            state["path"] = dest_for(filename)
            state["out"] = open(state["path"], "wb")  # noqa: SIM115 (closed in on_part_end)

    def on_part_data(data, start, end):
        if state["text"] is not None:
            value = state["text"][1]
            value += data[start:min(end, start + MAX_FIELD_BYTES + 1 - len(value))]
        if state["out"] is not None:
            state["size"] += end - start
            if state["size"] > max_bytes:
                state["too_big"] = True
                return
            if disk_room is not None and state["size"] > disk_room:
                state["no_room"] = True
                return
            state["out"].write(data[start:end])

    def on_part_end():
        if state["text"] is not None:
            name, value = state["text"]
            if len(value) <= MAX_FIELD_BYTES:
                state["fields"][name] = value.decode("utf-8", "replace")
            state["text"] = None
        if state["out"] is not None:
            state["out"].close()
            state["out"] = None
            state["done"] = True  # our part is complete; later parts are ignored

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    })
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if state["too_big"]:
                raise UploadError(413, "upload_too_large",
                                  f"the upload passed the limit of {max_bytes} bytes "
                                  f"(SAM2_MAX_UPLOAD_MB)")
            if state["no_room"]:
                raise UploadError(507, "insufficient_storage", _no_room(disk_room))
        parser.finalize()
    except (UploadError, HTTPException):
        _discard(state)
        raise
    except Exception as exc:
        _discard(state)
        if is_disk_full(exc):
            raise UploadError(507, "insufficient_storage",
                              "the server's disk is full: the upload could not be stored") \
                from exc
        raise UploadError(400, "malformed_upload", "the multipart body is malformed: send the "
                          "video as the 'file' field of a multipart/form-data form") from exc
    if state["path"] is None:
        raise UploadError(422, "missing_file", f"no '{field}' field in the form")
    if not state["done"]:
        _discard(state)
        raise UploadError(400, "malformed_upload", "the upload ended in the middle of the file")
    if state["size"] == 0:
        _discard(state)
        raise UploadError(422, "empty_file", "the uploaded file is empty")
    return state["path"], state["filename"], state["fields"]


def _no_room(room: int | None) -> str:
    return (f"the upload does not fit in what the disk quota leaves ({max(room or 0, 0)} bytes, "
            f"SAM2_MAX_DISK_GB); delete sessions you no longer need with DELETE /session/{{id}}")


def _discard(state: dict) -> None:
    if state["out"] is not None:
        state["out"].close()
        state["out"] = None
    if state["path"] is not None:
        Path(state["path"]).unlink(missing_ok=True)
