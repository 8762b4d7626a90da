"""A request's ``image_url`` parts read and checked: a data URL decoded, a local file read (with
``serve --allow-local-images``), an http(s) URL fetched (with ``serve --allow-remote-images``).
Every refusal is a 422 naming the part (a 501 when the image extra is missing); the images
themselves are decoded and checked by :mod:`diffgen.images`.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from diffgen.errors import DiffgenError, MissingExtraError
from diffgen.server.wire import ApiError, invalid

if TYPE_CHECKING:
    from diffgen.images import Picture

MAX_IMAGE_BYTES = 32 * 1024 * 1024  # one image's file, read or fetched, at most
FETCH_TIMEOUT = 15.0  # seconds a remote image may take to connect, or between two reads
FETCH_DEADLINE = 30.0  # seconds a remote image may take in all (a server trickling bytes meets this one)
FETCH_CHUNK = 64 * 1024  # bytes per read of a remote image (the deadline is checked between reads)


def unavailable(exc: MissingExtraError) -> ApiError:
    """The 501 of a server installed without the image extra."""
    return ApiError(501, f"{exc.message}: this server cannot take images ({exc.hint})", type="server_error",
                    code="images_unavailable")


def request_image(url: str, where: str, *, allow_local: bool, allow_remote: bool) -> Picture:
    """One ``image_url`` read and checked; a 422 naming the part when it may not be read here,
    cannot be read or is not a usable image."""
    from diffgen import images

    data = image_bytes(url, where, allow_local=allow_local, allow_remote=allow_remote)
    try:
        return images.read_image(data, where)
    except MissingExtraError as exc:
        raise unavailable(exc) from exc
    except DiffgenError as exc:
        raise ApiError(422, exc.message if not exc.hint else f"{exc.message} ({exc.hint})", param=where,
                       code="invalid_image") from exc


def image_bytes(url: str, where: str, *, allow_local: bool, allow_remote: bool) -> bytes:
    """The bytes behind an ``image_url``: a data URL decoded, a local file read (``allow_local``)
    or an http(s) URL fetched (``allow_remote``)."""
    import urllib.parse

    if url.startswith("data:"):
        return data_url_bytes(url, where)
    if url.startswith(("file://", "/")):
        if not allow_local:
            raise ApiError(422, f"{where}: this server does not read local files; send the image as a data URL, "
                                "or start the server with --allow-local-images", param=where,
                           code="local_images_disabled")
        return file_bytes(urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://")
                          else url, where)
    if not allow_remote:
        raise ApiError(422, f"{where}: this server does not fetch remote images; send the image as a data URL, "
                            "or start the server with --allow-remote-images", param=where,
                       code="remote_images_disabled")
    return fetch_image(url, where)


def data_url_bytes(url: str, where: str) -> bytes:
    """A base64 data URL's bytes."""
    import base64
    import binascii

    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise invalid(where, "a data URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(where, f"the data URL's base64 does not decode: {exc}") from exc


def file_bytes(path: str, where: str) -> bytes:
    """A local file's bytes, at most :data:`MAX_IMAGE_BYTES`."""
    try:
        # Only a regular file: opening a FIFO (or /dev/stdin, a terminal) would wait for a
        # writer forever, and a directory or device is no image.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise invalid(where, f"{path} is not a regular file")
        with open(path, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # replaced since the stat
                raise invalid(where, f"{path} is not a regular file")
            data = handle.read(MAX_IMAGE_BYTES + 1)
    except OSError as exc:
        raise invalid(where, f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_IMAGE_BYTES:
        raise invalid(where, f"{path} is over {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
    return data


def fetch_image(url: str, where: str, *, deadline: float = FETCH_DEADLINE,
                clock: Callable[[], float] = time.monotonic) -> bytes:
    """GET an http(s) image URL (``serve --allow-remote-images``): at most :data:`MAX_IMAGE_BYTES`,
    redirects followed by urllib, any failure a 422 naming the part. Each connect or read may take
    :data:`FETCH_TIMEOUT` seconds, and the whole fetch ``deadline`` seconds (by ``clock``), checked
    between reads of :data:`FETCH_CHUNK` bytes: urllib's timeout is per socket operation, so a
    server sending a byte every few seconds would otherwise hold the request for hours."""
    import urllib.error
    import urllib.request

    end = clock() + deadline
    data = bytearray()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "diffgen"}),
                                    timeout=FETCH_TIMEOUT) as response:
            while len(data) <= MAX_IMAGE_BYTES:
                if clock() > end:
                    raise invalid(where, f"fetching {url} took over {deadline:g} seconds")
                part = response.read(min(FETCH_CHUNK, MAX_IMAGE_BYTES + 1 - len(data)))
                if not part:
                    break
                data += part
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise invalid(where, f"cannot fetch {url}: {getattr(exc, 'reason', None) or exc}") from exc
    if len(data) > MAX_IMAGE_BYTES:
        raise invalid(where, f"the image at {url} is over {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
    return bytes(data)
