"""NBD protocol numbers (NetworkBlockDevice/nbd doc/proto.md), named as the spec names them."""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Wire layouts shared by the server and client state machines.
GREETING = struct.Struct(">QQH")           # NBDMAGIC, IHAVEOPT, handshake flags
OPTION_HEADER = struct.Struct(">QII")      # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")       # magic, error, cookie
CHUNK_HEADER = struct.Struct(">IHHQI")     # magic, flags, type, cookie, length
ERROR_PAYLOAD = struct.Struct(">IH")       # error, message length

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERR = 1 << 31


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERR + 1
    ERR_POLICY = REP_ERR + 2
    ERR_INVALID = REP_ERR + 3
    ERR_PLATFORM = REP_ERR + 4
    ERR_TLS_REQD = REP_ERR + 5
    ERR_UNKNOWN = REP_ERR + 6
    ERR_SHUTDOWN = REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = REP_ERR + 8
    ERR_TOO_BIG = REP_ERR + 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlag(IntFlag):
    """Transmission flags sent with the export size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class Reply(IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1 << 0


class Err(IntEnum):
    """Error values on the wire; fixed by the spec, not the host's errno."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# base:allocation status flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"

# Bounds. Payloads up to 32 MiB must not be treated as an attack (spec: 2^25).
MAX_PAYLOAD = 32 * 1024 * 1024
PREFERRED_BLOCK = 4096
MIN_BLOCK = 1
MAX_STRING = 4096
# Option data beyond this is discarded unread and answered ERR_TOO_BIG.
MAX_OPTION_DATA = 64 * 1024


class NeedData:
    """What a protocol machine's `next_event` returns when it needs more bytes."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()   # one sentinel for the server and client machines alike

# Options one negotiation may send before it is cut off (haggling is bounded); generous
# enough for `nbdinfo --list` over a thousand exports (LIST plus one INFO each).
MAX_OPTIONS = 4096
