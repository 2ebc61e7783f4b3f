"""Reading a WADO-RS ``multipart/related`` answer part by part, straight from the socket.

`parts(stream, boundary)` pulls each part's body out of a buffered binary stream (an
`http.client.HTTPResponse`, an `io.BufferedReader`), as the bytes arrive, one part at a time:
memory is bounded by one instance, never by the study.

RFC 2046 §5.1.1: a preamble, then parts each introduced by CRLF "--" boundary (no CRLF before
the very first), transport padding and CRLF, headers, an empty line and the body; "--" after a
delimiter closes the body, an epilogue may follow and is ignored.

Why a pull reader: the framing (delimiter lines, part headers) is read a line at a time, and
when a part gives its Content-Length (Orthanc's do), its body is read with one ``read(length)``,
which fills one new bytes object straight from the socket: one copy of every byte, no search
through it. A length is trusted only if the delimiter comes right after; otherwise, and when
there is no length, the body is searched for the delimiter. This costs about a quarter of the
CPU of parsing chunks handed out by an HTTP library (docs/performance.md, gateway).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, Protocol

MAX_PART_HEADER_BYTES: Final = 16 * 1024
MAX_PREAMBLE_BYTES: Final = 1024 * 1024
# The largest instance accepted (memory holds one instance): an archive that sends more, or
# declares more, is refused rather than followed until memory runs out.
DEFAULT_MAX_PART_BYTES: Final = 4 * 1024**3
_SEARCH_READ_BYTES: Final = 64 * 1024
# A part's declared length is read in pieces of at most this: memory follows what arrives,
# not what a header claims.
_MAX_SINGLE_READ: Final = 16 * 1024 * 1024


class BufferedStream(Protocol):
    def read(self, size: int, /) -> bytes: ...
    def read1(self, size: int, /) -> bytes: ...
    def readline(self, size: int, /) -> bytes: ...
    def peek(self, size: int, /) -> bytes: ...


class MalformedMultipart(Exception):
    """The answer is not a well-formed multipart body of DICOM instances."""


class MultipartCutShort(MalformedMultipart):
    """The answer ended before its closing delimiter."""


class MultipartParts:
    """The parts of one multipart body; iterate once. `where` says how far it got."""

    def __init__(
        self,
        stream: BufferedStream,
        boundary: bytes,
        *,
        max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
    ) -> None:
        if not boundary:
            raise ValueError("empty multipart boundary")
        self._stream = stream
        self._max_part_bytes = max_part_bytes
        self._pushback = bytearray()  # bytes read past a delimiter while searching for it
        self._dash_boundary = b"--" + boundary
        self._delimiter = b"\r\n--" + boundary
        self.count = 0
        self.finished = False
        self._in_part = False

    @property
    def where(self) -> str:
        if self._in_part:
            return f"in the middle of instance {self.count + 1}"
        if self.count == 0:
            return "before the first instance"
        return f"after {self.count} instance(s), without the closing boundary"

    def __iter__(self) -> Iterator[bytes]:
        self._skip_preamble()
        while not self.finished:
            self._in_part = True
            length = self._read_headers()
            body = self._read_body(length)
            if not body:
                raise MalformedMultipart(f"part {self.count + 1} is empty")
            self.count += 1
            self._in_part = False
            yield body

    def pending(self, head_size: int) -> Iterator[PendingPart]:
        """The parts with only their first `head_size` bytes read: the caller moves the rest of
        each body itself (`PendingPart`), before asking for the next one; what it leaves
        unread is read and dropped then. A part without Content-Length is read whole. A
        declared length is trusted as it is read, so a delimiter that does not follow it is
        an error here, not a reason to search (the bytes may be gone already)."""
        if head_size < 1:
            raise ValueError("head_size must be positive")
        self._skip_preamble()
        while not self.finished:
            self._in_part = True
            length = self._read_headers()
            if length is None:
                body = self._search(bytearray())  # the boundary found (and read) after it
                part = PendingPart(self, body, 0, boundary_seen=True)
            else:
                if length > self._max_part_bytes:
                    raise MalformedMultipart(
                        f"a part of {length} bytes (at most {self._max_part_bytes})"
                    )
                head = self._read(min(length, head_size))
                if len(head) < min(length, head_size):
                    raise MultipartCutShort("cut in a part")
                part = PendingPart(self, head, length - len(head))
            if not part.length:
                raise MalformedMultipart(f"part {self.count + 1} is empty")
            yield part
            while part.unread:  # what the caller did not take
                if not part.read_rest(_SEARCH_READ_BYTES):
                    raise MultipartCutShort("cut in a part")
            if length is not None:
                after = self._read(len(self._delimiter))
                if after != self._delimiter:
                    if len(after) < len(self._delimiter) and self._delimiter.startswith(after):
                        raise MultipartCutShort("cut after a part")
                    raise MalformedMultipart(
                        f"part {self.count + 1} is not followed by the boundary its "
                        "Content-Length announces"
                    )
                self._after_delimiter(self._readline(MAX_PART_HEADER_BYTES))
            self.count += 1
            self._in_part = False

    # ---------------------------------------------------------------- framing

    def _skip_preamble(self) -> None:
        at_line_start = True
        skipped = 0
        while True:
            line = self._readline(MAX_PART_HEADER_BYTES)
            if not line:
                raise MultipartCutShort("no boundary")
            skipped += len(line)
            if skipped > MAX_PREAMBLE_BYTES:
                raise MalformedMultipart("no boundary in the first MiB")
            if at_line_start and line.startswith(self._dash_boundary):
                self._after_delimiter(line[len(self._dash_boundary) :])
                return
            at_line_start = line.endswith(b"\n")

    def _after_delimiter(self, rest: bytes) -> None:
        """What follows a delimiter on its line: "--" (the end), or padding and CRLF."""
        if rest.startswith(b"--"):
            self.finished = True
            return
        if not rest.endswith(b"\n"):
            if len(rest) >= MAX_PART_HEADER_BYTES - len(self._dash_boundary):
                raise MalformedMultipart("no line end after a boundary")
            raise MultipartCutShort("cut after a boundary")
        if not rest.endswith(b"\r\n") or rest[:-2].strip(b" \t"):
            raise MalformedMultipart("unexpected bytes after a boundary")

    def _read_headers(self) -> int | None:
        block = b""
        while not (block == b"\r\n" or block.endswith(b"\r\n\r\n")):
            line = self._readline(MAX_PART_HEADER_BYTES + 1 - len(block))
            if not line:
                raise MultipartCutShort("cut in the part headers")
            block += line
            if len(block) > MAX_PART_HEADER_BYTES:
                raise MalformedMultipart("part headers too long")
        return _part_length(block[:-4] if len(block) > 2 else b"")

    def _read_body(self, length: int | None) -> bytes:
        if length is not None:
            if length > self._max_part_bytes:
                raise MalformedMultipart(
                    f"a part of {length} bytes (at most {self._max_part_bytes})"
                )
            body = self._read(length)
            if len(body) < length:  # cut short, or the length overstated: search what came
                return self._search(bytearray(body))
            after = self._read(len(self._delimiter))
            if after == self._delimiter:
                self._after_delimiter(self._readline(MAX_PART_HEADER_BYTES))
                return body
            # the length was wrong: search the body and what followed for the delimiter
            self._unread(after)
            return self._search(bytearray(body))
        return self._search(bytearray())

    def _search(self, pending: bytearray) -> bytes:
        delimiter = self._delimiter
        scan_from = 0
        while True:
            index = pending.find(delimiter, scan_from)
            if index >= 0:
                with memoryview(pending) as view:
                    body = bytes(view[:index])
                    self._unread(bytes(view[index + len(delimiter) :]))
                self._after_delimiter(self._readline(MAX_PART_HEADER_BYTES))
                return body
            scan_from = max(0, len(pending) - len(delimiter) + 1)
            if len(pending) > self._max_part_bytes:
                raise MalformedMultipart(f"a part larger than {self._max_part_bytes} bytes")
            chunk = self._read1(_SEARCH_READ_BYTES)
            if not chunk:
                raise MultipartCutShort("cut in a part")
            pending += chunk

    # ---------------------------------------------------------------- the stream

    def _unread(self, data: bytes) -> None:
        self._pushback[:0] = data

    def _read(self, size: int) -> bytes:
        if not self._pushback:
            return self._read_exactly(size)
        taken = bytes(self._pushback[:size])
        del self._pushback[:size]
        if len(taken) < size:
            taken += self._read_exactly(size - len(taken))
        return taken

    def _read_exactly(self, size: int) -> bytes:
        """`size` bytes, fewer only at the end of the stream (a buffered stream's read may
        return short when its source does)."""
        data = self._stream.read(min(size, _MAX_SINGLE_READ))
        if len(data) == size or not data:
            return data
        pieces = [data]
        missing = size - len(data)
        while missing:
            more = self._stream.read(min(missing, _MAX_SINGLE_READ))
            if not more:
                break
            pieces.append(more)
            missing -= len(more)
        return b"".join(pieces)

    def _read1(self, size: int) -> bytes:
        if self._pushback:
            taken = bytes(self._pushback[:size])
            del self._pushback[:size]
            return taken
        return self._stream.read1(size)

    def _readline(self, limit: int) -> bytes:
        if not self._pushback:
            return self._stream.readline(limit)
        end = self._pushback.find(b"\n", 0, limit)
        size = limit if end < 0 else end + 1
        line = bytes(self._pushback[:size])
        del self._pushback[:size]
        if not line.endswith(b"\n") and len(line) < limit:
            line += self._stream.readline(limit - len(line))
        return line


class PendingPart:
    """A part whose first bytes (`head`) are read, the rest of its body (`unread` bytes) still
    to come from the stream. Take the rest with `read_rest`, or move it past Python: first
    `take_buffered` (what the stream has already read ahead), then the remaining `unread` bytes
    straight from the stream's file descriptor, reported with `consumed`."""

    def __init__(
        self, parts: MultipartParts, head: bytes, unread: int, *, boundary_seen: bool = False
    ) -> None:
        self._parts = parts
        self._boundary_seen = boundary_seen
        self.head = head
        self.unread = unread
        self.length = len(head) + unread

    def extend_head(self, size: int) -> None:
        """Read more of the body into `head`, up to `size` bytes in all."""
        wanted = min(self.unread, size - len(self.head))
        if wanted <= 0:
            return
        more = self._parts._read(wanted)
        self.unread -= len(more)
        self.head += more
        if len(more) < wanted:
            raise MultipartCutShort("cut in a part")

    def take_buffered(self) -> bytes:
        """The bytes of the rest already read from the file descriptor (a buffered stream reads
        ahead): after this, the next `unread` bytes of the body are the descriptor's next."""
        parts = self._parts
        taken = b""
        if self.unread and parts._pushback:
            taken = parts._read(min(self.unread, len(parts._pushback)))
            self.unread -= len(taken)
        if self.unread and not parts._pushback:
            buffered = parts._stream.peek(1)
            if buffered:
                more = parts._stream.read(min(self.unread, len(buffered)))
                self.unread -= len(more)
                taken += more
        return taken

    def consumed(self, count: int) -> None:
        """`count` bytes of the rest were taken from the file descriptor by the caller."""
        if not 0 <= count <= self.unread:
            raise ValueError(f"{count} bytes consumed of {self.unread} unread")
        self.unread -= count

    def boundary_follows(self) -> bool:
        """Whether the multipart boundary comes right after the body, all of it taken: its
        Content-Length told the truth (the bytes looked at are left for the reader)."""
        if self.unread:
            raise ValueError(f"{self.unread} bytes of the part are still unread")
        if self._boundary_seen:
            return True
        parts = self._parts
        after = parts._read(len(parts._delimiter))
        parts._unread(after)
        return after == parts._delimiter

    def read_rest(self, size: int) -> bytes:
        """The next piece of the rest (at most `size` bytes); b"" once it is all read."""
        if not self.unread:
            return b""
        piece = self._parts._read(min(size, self.unread))
        if not piece:
            raise MultipartCutShort("cut in a part")
        self.unread -= len(piece)
        return piece


def _part_length(raw: bytes) -> int | None:
    """The part's Content-Length, if given; its Content-Type must be application/dicom."""
    length = None
    for line in raw.split(b"\r\n") if raw else ():
        name, sep, value = line.partition(b":")
        if not sep:
            raise MalformedMultipart(f"malformed part header {line[:80]!r}")
        key = name.strip().lower()
        if key == b"content-type":
            media = value.split(b";")[0].strip().lower()
            if media != b"application/dicom":
                raise MalformedMultipart(
                    f"a part is {media.decode('latin-1')!r}, not application/dicom"
                )
        elif key == b"content-length":
            text = value.strip()
            if not text.isdigit() or len(text) > 12:
                raise MalformedMultipart(f"invalid part Content-Length {text[:20]!r}")
            length = int(text)
    return length
