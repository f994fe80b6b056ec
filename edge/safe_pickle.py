"""Read a pickled numpy array from untrusted bytes without unpickling it.

:func:`loads_ndarray` walks the pickle opcode stream itself and accepts exactly what ``pickle.dumps(a, protocol=p)``
writes for an ndarray ``a`` of a numeric dtype (``float16/32/64``, ``int8/16/32/64``, ``uint8/16``), 1 to 6
dimensions, C or Fortran order, either byte order, by numpy 1.19 on Python 3.6 and numpy 2 on Python 3.11, with
pickle protocols 2, 3, 4 and 5. It never calls an unpickler, never imports or calls a name a pickle gives, and
never builds a dtype from peer values: the pickle is a program, and here it is only read.

What numpy writes (``pickletools.dis`` of each protocol; ``G(...)`` a global, ``R`` REDUCE, ``b`` BUILD)::

    protocols 2-4, and 5 for an array that is neither C- nor Fortran-contiguous:
        G(numpy[._]core.multiarray _reconstruct) (G(numpy ndarray), (0,), b"b") R
        (1, shape, DTYPE, fortran, data) b
    protocol 5, C- or Fortran-contiguous (in-band; numpy passes a PickleBuffer):
        G(numpy[._]core.numeric _frombuffer) (data, DTYPE, shape, "C" or "F") R
    DTYPE:
        G(numpy dtype) (name, False, True) R  (3, endian, None, None, None, -1, -1, 0) b

``name`` is one of ``f2 f4 f8 i1 i2 i4 i8 u1 u2``; ``endian`` is ``|`` for a 1-byte dtype, else ``<``, ``>`` or
``=`` (native); ``shape`` a tuple of ints; ``fortran`` True or False (the data's layout); ``data`` the array's
bytes: BINBYTES/SHORT_BINBYTES (protocols 3, 4, non-contiguous 5), BYTEARRAY8 or bytes (protocol 5), and with
protocol 2, which has no bytes type, ``G(_codecs encode) (str, "latin1") R`` where ``str`` holds one character per
byte (this reader does the latin-1 encoding itself; ``_codecs.encode`` is never called). The ``b"b"`` of
``_reconstruct`` is such a call too with protocol 2. Any value may come through the memo (numpy's pickles
BINGET a 1-byte data block that is the same cached object as ``b"b"``, and the module name ``numpy``).

Accepted opcodes, with the lowest protocol that may use them:

- protocol 2: PROTO (the first opcode, 2 to 5), STOP (the last byte), GLOBAL (module and name lines of at most 64
  ASCII bytes), REDUCE, BUILD, MARK, TUPLE, TUPLE1, TUPLE2, TUPLE3, NONE, NEWTRUE, NEWFALSE, BININT1, BININT2,
  BININT, BINUNICODE, BINPUT, LONG_BINPUT, BINGET, LONG_BINGET;
- protocol 3: SHORT_BINBYTES, BINBYTES;
- protocol 4: FRAME, STACK_GLOBAL, MEMOIZE, SHORT_BINUNICODE, BINUNICODE8, BINBYTES8;
- protocol 5: BYTEARRAY8.

Every other opcode is refused, among them DUP, POP, the dict/list/set builders, LONG/LONG1/LONG4, EMPTY_TUPLE,
NEWOBJ, EXT*, PERSID and protocol 5's out-of-band NEXT_BUFFER/READONLY_BUFFER (a socket carries no out-of-band
buffers). Protocols 0 and 1 are refused; so is an opcode newer than the protocol the pickle declared.

Bounds, all checked before the work they bound: at most :data:`MAX_OPCODES` (256) opcodes, :data:`MAX_STACK` (32)
stack items, :data:`MAX_MARKS` (4) open marks, :data:`MAX_MEMO` (64) memo slots, tuples nested at most
:data:`MAX_TUPLE_DEPTH` (3) deep. A length read from the stream is compared with the bytes left and with the size
the metadata implies (``prod(shape) * itemsize`` for bytes, twice that for protocol 2's UTF-8 text, at least
:data:`_SHORT_LIMIT`) before anything is sliced or decoded; data blocks stay views of the input. Each opcode costs
time proportional to its own bytes, so a parse is linear in the input length. The array is built only after the
pickle's dtype, shape and data length equal what the metadata says, with ``np.frombuffer(...).reshape(...)``,
then copied (``astype``) to the native byte order, C order, writable.

Every refusal is a :class:`ProtocolError` naming the opcode, its offset and what was expected; peer values appear
in messages only through :func:`_describe`, which bounds their length.

Runs on Python 3.6 + numpy 1.19 (the Jetson Nano) as well as current Python and numpy 2.
"""
import pickletools
import struct

import numpy as np

from .errors import ProtocolError

MAX_OPCODES = 256  # numpy writes at most about 75 (protocol 2, 6 dimensions)
MAX_STACK = 32  # items on the stack at once; numpy needs at most 13
MAX_MARKS = 4  # open MARKs; numpy nests 2
MAX_MEMO = 64  # memo slots; numpy uses at most about 25
MAX_TUPLE_DEPTH = 3  # numpy nests 2: the shape inside the state, (0,) inside _reconstruct's arguments
_SHORT_LIMIT = 64  # bytes: every string numpy writes except the data (module names, dtype names, ...)
_LOWEST_PROTOCOL, _HIGHEST_PROTOCOL = 2, 5

# Frame metadata dtype -> the name numpy's dtype pickle gives it (the allow-list; numeric dtypes only).
DTYPE_NAMES = {"float32": "f4", "float16": "f2", "float64": "f8", "uint8": "u1", "int8": "i1", "uint16": "u2",
               "int16": "i2", "int32": "i4", "int64": "i8"}
_BY_PICKLE_NAME = dict((v, k) for k, v in DTYPE_NAMES.items())

# The globals numpy's array pickles name, as tokens: (module, name) -> role. None is ever imported.
_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",  # numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",  # numpy 2
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",  # protocol 5, numpy 1.x
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",  # protocol 5, numpy 2
    ("_codecs", "encode"): "encode",  # protocol 2 spells bytes as _codecs.encode(text, "latin1")
}
_DTYPE_STATE_TAIL = (None, None, None, -1, -1, 0)  # (3, endian, <these>): no subarray, fields, sizes or flags
_INT = struct.Struct("<i")
_UINT1, _UINT2, _UINT4, _UINT8 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")


class _Global(object):
    """A global a pickle named: only its role; calling it means checking arguments, never calling anything."""
    __slots__ = ("module", "name", "role")

    def __init__(self, module, name, role):
        self.module, self.name, self.role = module, name, role


class _Tuple(object):
    """A tuple the pickle built; ``depth``: how deeply tuples nest in it (1 for a flat one)."""
    __slots__ = ("items", "depth")

    def __init__(self, items):
        self.items = tuple(items)
        self.depth = 1 + max([item.depth for item in self.items if isinstance(item, _Tuple)] or [0])


class _Raw(object):
    """A block of bytes (``kind`` "bytes" or "bytearray"): a view of the input, never a copy."""
    __slots__ = ("view", "kind")

    def __init__(self, view, kind):
        self.view, self.kind = view, kind


class _Dtype(object):
    """``numpy.dtype(name, False, True)`` as a pickle asked for it; ``endian`` is set by its BUILD."""
    __slots__ = ("name", "endian")

    def __init__(self, name):
        self.name, self.endian = name, None


class _Array(object):
    """The array a pickle describes; ``complete`` once dtype, shape, layout and data are known and checked."""
    __slots__ = ("dtype", "fortran", "data", "complete")

    def __init__(self):
        self.dtype = self.fortran = self.data = None
        self.complete = False


def _describe(value, nested=False):
    """A short, bounded text for a peer value in an error message (never the value's own repr or str)."""
    if value is None or isinstance(value, (bool, int)):
        return repr(value)  # ints come from at most 4 bytes
    if isinstance(value, str):
        return repr(value[:24]) + ("... (%d characters)" % len(value) if len(value) > 24 else "")
    if isinstance(value, _Raw):
        return "%s of %d bytes" % (value.kind, len(value.view))
    if isinstance(value, _Tuple):
        if nested:
            return "(...)" if value.items else "()"
        shown = [_describe(item, True) for item in value.items[:8]]
        if len(value.items) > 8:
            shown.append("... %d items" % len(value.items))
        return "(" + ", ".join(shown) + ("," if len(value.items) == 1 else "") + ")"
    if isinstance(value, _Global):
        return "%s.%s" % (value.module, value.name)
    if isinstance(value, _Dtype):
        return "dtype %r" % value.name
    if isinstance(value, _Array):
        return "an ndarray"
    return type(value).__name__


def _is_int(value):
    return type(value) is int  # not bool: NEWTRUE may not stand for a 1


def _format_shape(shape):
    return "[" + ", ".join(str(d) for d in shape) + "]"


class _Reader(object):
    """One pass over a pickle; :meth:`run` returns the checked :class:`_Array`. Not reusable."""

    def __init__(self, data, dtype_name, shape):
        self.view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
        self.end = len(self.view)
        self.dtype_name = dtype_name
        self.shape = shape
        self.itemsize = np.dtype(dtype_name).itemsize  # an allowed name: a fixed, known dtype
        count = 1
        for dim in shape:
            count *= dim
        self.nbytes = count * self.itemsize
        self.bytes_limit = max(_SHORT_LIMIT, self.nbytes)
        self.text_limit = max(_SHORT_LIMIT, 2 * self.nbytes)  # protocol 2: bytes 0x80-0xff are 2 bytes of UTF-8
        self.stack = []
        self.marks = []  # stack lengths at each open MARK
        self.memo = {}
        self.protocol = None
        self.pos = 0  # offset of the opcode being read
        self.op = "start"

    # --- reading the stream ---------------------------------------------------------------------------------
    def fail(self, message):
        raise ProtocolError("pickle payload refused: %s at offset %d: %s" % (self.op, self.pos, message))

    def take(self, n, at):
        """The ``n`` bytes at offset ``at`` as a view; refuses before slicing when fewer are left."""
        if n > self.end - at:
            self.fail("needs %d byte(s), only %d left (truncated, or a length that lies)" % (n, self.end - at))
        return self.view[at:at + n]

    def unpack(self, fmt, at):
        self.take(fmt.size, at)
        return fmt.unpack_from(self.view, at)[0]

    def blob(self, at, length_fmt, kind):
        """A bytes-like argument: its length (``length_fmt``), checked, then a view of that many bytes."""
        n = self.unpack(length_fmt, at)
        limit = self.text_limit if kind == "text" else self.bytes_limit
        if n > limit:
            self.fail("length %d is over the %d bytes a %s %s array can need" % (n, limit, self.dtype_name,
                                                                             _format_shape(self.shape)))
        return self.take(n, at + length_fmt.size), at + length_fmt.size + n

    def push(self, value):
        if len(self.stack) >= MAX_STACK:
            self.fail("more than %d items on the stack" % MAX_STACK)
        self.stack.append(value)

    def pop(self, n):
        """The top ``n`` items (in stack order), all above the innermost MARK."""
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) - floor < n:
            self.fail("needs %d stack items%s, has %d" % (n, " above the MARK" if self.marks else "",
                                                          len(self.stack) - floor))
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return items

    def top(self):
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) <= floor:
            self.fail("the stack is empty%s" % (" above the MARK" if self.marks else ""))
        return self.stack[-1]

    def put(self, index):
        if not 0 <= index < MAX_MEMO:
            self.fail("memo index %d is over the limit of %d" % (index, MAX_MEMO - 1))
        self.memo[index] = self.top()

    def get(self, index):
        if index not in self.memo:
            self.fail("memo index %d was never stored (stored: %d entries)" % (index, len(self.memo)))
        self.push(self.memo[index])

    def make_tuple(self, items):
        t = _Tuple(items)
        if t.depth > MAX_TUPLE_DEPTH:
            self.fail("tuples nested %d deep (numpy's array pickles nest 2; at most %d)" % (t.depth, MAX_TUPLE_DEPTH))
        self.push(t)

    def lookup(self, module, name):
        role = _GLOBALS.get((module, name))
        if role is None:
            self.fail("global %s.%s is not allowed (only the names numpy's array pickles use: %s)" % (
                _describe(module)[1:-1], _describe(name)[1:-1],
                ", ".join(sorted("%s.%s" % pair for pair in _GLOBALS))))
        self.push(_Global(module, name, role))

    def text(self, raw):
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            self.fail("text is not UTF-8 (%s)" % exc.reason)

    # --- opcodes: each takes the offset after the opcode byte, returns the offset of the next -------------------
    def op_proto(self, at):
        version = self.unpack(_UINT1, at)
        if self.pos != 0:
            self.fail("PROTO may only open the pickle")
        if not _LOWEST_PROTOCOL <= version <= _HIGHEST_PROTOCOL:
            self.fail("protocol %d is not accepted (numpy arrays pickled with protocols 2 to 5 are)" % version)
        self.protocol = version
        return at + 1

    def op_frame(self, at):
        length = self.unpack(_UINT8, at)  # a buffering hint: the opcodes inside are read as usual
        if length > self.end - at - 8:
            self.fail("frame of %d bytes, only %d left" % (length, self.end - at - 8))
        return at + 8

    def op_global(self, at):
        parts = []
        for what in ("module", "name"):
            line = bytes(self.view[at:min(self.end, at + _SHORT_LIMIT + 1)])
            newline = line.find(b"\n")
            if newline < 0:
                self.fail("the %s is not a line of at most %d bytes" % (what, _SHORT_LIMIT))
            try:
                parts.append(line[:newline].decode("ascii"))
            except UnicodeDecodeError:
                self.fail("the %s %r is not ASCII" % (what, line[:newline][:24]))
            at += newline + 1
        self.lookup(parts[0], parts[1])
        return at

    def op_stack_global(self, at):
        module, name = self.pop(2)
        if not (isinstance(module, str) and isinstance(name, str)):
            self.fail("module and name are %s and %s (expected two strings)" % (_describe(module), _describe(name)))
        self.lookup(module, name)
        return at

    def op_memoize(self, at):
        self.put(len(self.memo))
        return at

    def op_binput(self, at):
        self.put(self.unpack(_UINT1, at))
        return at + 1

    def op_long_binput(self, at):
        self.put(self.unpack(_UINT4, at))
        return at + 4

    def op_binget(self, at):
        self.get(self.unpack(_UINT1, at))
        return at + 1

    def op_long_binget(self, at):
        self.get(self.unpack(_UINT4, at))
        return at + 4

    def op_mark(self, at):
        if len(self.marks) >= MAX_MARKS:
            self.fail("more than %d open MARKs" % MAX_MARKS)
        self.marks.append(len(self.stack))
        return at

    def op_tuple(self, at):
        if not self.marks:
            self.fail("TUPLE without a MARK")
        floor = self.marks.pop()
        items = self.stack[floor:]
        del self.stack[floor:]
        self.make_tuple(items)
        return at

    def op_tuple1(self, at):
        self.make_tuple(self.pop(1))
        return at

    def op_tuple2(self, at):
        self.make_tuple(self.pop(2))
        return at

    def op_tuple3(self, at):
        self.make_tuple(self.pop(3))
        return at

    def op_none(self, at):
        self.push(None)
        return at

    def op_newtrue(self, at):
        self.push(True)
        return at

    def op_newfalse(self, at):
        self.push(False)
        return at

    def op_binint1(self, at):
        self.push(self.unpack(_UINT1, at))
        return at + 1

    def op_binint2(self, at):
        self.push(self.unpack(_UINT2, at))
        return at + 2

    def op_binint(self, at):
        self.push(self.unpack(_INT, at))
        return at + 4

    def op_short_binunicode(self, at):
        raw, at = self.blob(at, _UINT1, "text")
        self.push(self.text(raw))
        return at

    def op_binunicode(self, at):
        raw, at = self.blob(at, _UINT4, "text")
        self.push(self.text(raw))
        return at

    def op_binunicode8(self, at):
        raw, at = self.blob(at, _UINT8, "text")
        self.push(self.text(raw))
        return at

    def op_short_binbytes(self, at):
        raw, at = self.blob(at, _UINT1, "bytes")
        self.push(_Raw(raw, "bytes"))
        return at

    def op_binbytes(self, at):
        raw, at = self.blob(at, _UINT4, "bytes")
        self.push(_Raw(raw, "bytes"))
        return at

    def op_binbytes8(self, at):
        raw, at = self.blob(at, _UINT8, "bytes")
        self.push(_Raw(raw, "bytes"))
        return at

    def op_bytearray8(self, at):
        raw, at = self.blob(at, _UINT8, "bytes")
        self.push(_Raw(raw, "bytearray"))
        return at

    def op_reduce(self, at):
        func, args = self.pop(2)
        if not isinstance(func, _Global):
            self.fail("calls %s (only numpy's _reconstruct, dtype and _frombuffer, and _codecs.encode)"
                      % _describe(func))
        if not isinstance(args, _Tuple):
            self.fail("calls %s with %s (expected an argument tuple)" % (_describe(func), _describe(args)))
        if func.role == "ndarray":
            self.fail("calls numpy.ndarray directly (numpy's pickles only pass it to _reconstruct)")
        self.push(getattr(self, "call_" + func.role)(args.items))
        return at

    def op_build(self, at):
        target, state = self.pop(2)
        if isinstance(target, _Dtype) and target.endian is None:
            self.build_dtype(target, state)
        elif isinstance(target, _Array) and not target.complete and target.dtype is None:
            self.build_array(target, state)
        else:
            self.fail("sets the state of %s (numpy's pickles only set it on a new dtype or on the empty array "
                      "_reconstruct made)" % _describe(target))
        self.push(target)
        return at

    # --- the four calls and two states numpy's pickles contain ---------------------------------------------
    def call_encode(self, args):
        if len(args) != 2 or not isinstance(args[0], str) or not isinstance(args[1], str) or args[1] != "latin1":
            self.fail("_codecs.encode%s (expected (text, 'latin1'))" % _describe(_Tuple(args)))
        try:
            return _Raw(memoryview(args[0].encode("latin-1")), "bytes")
        except UnicodeEncodeError:
            self.fail("_codecs.encode of text with characters above U+00FF (latin-1 bytes are 0 to 255)")

    def call_dtype(self, args):
        if (len(args) != 3 or not isinstance(args[0], str) or args[0] not in _BY_PICKLE_NAME
                or args[1] is not False or args[2] is not True):
            self.fail("numpy.dtype%s (expected (name, False, True) with name one of %s)" % (
                _describe(_Tuple(args)), ", ".join(sorted(_BY_PICKLE_NAME))))
        return _Dtype(args[0])

    def call_reconstruct(self, args):
        if (len(args) != 3 or not isinstance(args[0], _Global) or args[0].role != "ndarray"
                or not isinstance(args[1], _Tuple) or len(args[1].items) != 1 or not _is_int(args[1].items[0])
                or args[1].items[0] != 0 or not isinstance(args[2], _Raw) or args[2].view != b"b"):
            self.fail("_reconstruct%s (expected (numpy.ndarray, (0,), b'b'))" % _describe(_Tuple(args)))
        return _Array()

    def call_frombuffer(self, args):
        if len(args) != 4 or not isinstance(args[3], str) or args[3] not in ("C", "F"):
            self.fail("_frombuffer%s (expected (data, dtype, shape, 'C' or 'F'))" % _describe(_Tuple(args)))
        array = _Array()
        self.complete(array, args[1], args[2], args[3] == "F", args[0], ("bytes", "bytearray"))
        return array

    def build_dtype(self, dtype, state):
        items = state.items if isinstance(state, _Tuple) else None
        if (items is None or len(items) != 8 or not _is_int(items[0]) or items[0] != 3
                or not isinstance(items[1], str) or any(not (a is b or (_is_int(a) and a == b))
                                                        for a, b in zip(items[2:], _DTYPE_STATE_TAIL))):
            self.fail("dtype state %s (expected (3, endian, None, None, None, -1, -1, 0))" % _describe(state))
        single = np.dtype(_BY_PICKLE_NAME[dtype.name]).itemsize == 1
        if items[1] not in (("|",) if single else ("<", ">", "=")):
            self.fail("byte order %s for dtype %r (expected %s)" % (
                _describe(items[1]), dtype.name, "'|'" if single else "'<', '>' or '='"))
        dtype.endian = items[1]

    def build_array(self, array, state):
        items = state.items if isinstance(state, _Tuple) else None
        if items is None or len(items) != 5 or not _is_int(items[0]) or items[0] != 1 or not isinstance(
                items[3], bool):
            self.fail("array state %s (expected (1, shape, dtype, fortran flag, data))" % _describe(state))
        self.complete(array, items[2], items[1], items[3], items[4], ("bytes",))

    def complete(self, array, dtype, shape, fortran, data, data_kinds):
        """Check an array's parts against the metadata, before any array exists."""
        if not isinstance(dtype, _Dtype) or dtype.endian is None:
            self.fail("the array's dtype is %s (expected a dtype with its state)" % _describe(dtype))
        if _BY_PICKLE_NAME[dtype.name] != self.dtype_name:
            self.fail("the pickle's dtype %r (%s) does not match the metadata's %s" % (
                dtype.name, _BY_PICKLE_NAME[dtype.name], self.dtype_name))
        if not isinstance(shape, _Tuple) or not all(_is_int(d) for d in shape.items):
            self.fail("the array's shape is %s (expected a tuple of integers)" % _describe(shape))
        if shape.items != self.shape:
            self.fail("the pickle's shape %s does not match the metadata's %s" % (
                _describe(shape), _format_shape(self.shape)))
        if not isinstance(data, _Raw) or data.kind not in data_kinds:
            self.fail("the array's data is %s (expected %s)" % (_describe(data), " or ".join(data_kinds)))
        if len(data.view) != self.nbytes:
            self.fail("the array's data is %d bytes, but %s %s needs %d" % (
                len(data.view), self.dtype_name, _format_shape(self.shape), self.nbytes))
        array.dtype, array.fortran, array.data, array.complete = dtype, fortran, data, True

    # --- the loop -------------------------------------------------------------------------------------------
    def run(self):
        at = count = 0
        while True:
            if at >= self.end:
                self.pos, self.op = at, "end"
                self.fail("the pickle ends without STOP (truncated?)")
            self.pos, code = at, self.view[at]
            entry = _OPCODES.get(code)
            if entry is None:
                if code in _OUT_OF_BAND:
                    self.op = _OUT_OF_BAND[code]
                    self.fail("out-of-band buffers (protocol 5) cannot arrive over a socket")
                known = pickletools.code2op.get(chr(code))
                self.op = known.name if known is not None else "byte 0x%02x" % code
                self.fail("not an opcode numpy writes for an ndarray" if known is not None else "not a pickle opcode")
            self.op, lowest, method = entry
            count += 1
            if count > MAX_OPCODES:
                self.fail("more than %d opcodes (numpy's array pickles have under 100)" % MAX_OPCODES)
            if self.protocol is None and code != 0x80:
                self.fail("the pickle does not start with PROTO (protocols 0 and 1 are not accepted)")
            if self.protocol is not None and lowest > self.protocol:
                self.fail("needs protocol %d, the pickle declared %d" % (lowest, self.protocol))
            if method is None:  # STOP
                return self.stop(at + 1)
            at = getattr(self, method)(at + 1)

    def stop(self, after):
        if after != self.end:
            self.fail("%d bytes follow STOP" % (self.end - after))
        if self.marks:
            self.fail("%d MARKs were never closed" % len(self.marks))
        if len(self.stack) != 1:
            self.fail("%d items on the stack (expected the array alone)" % len(self.stack))
        result = self.stack[0]
        if not isinstance(result, _Array) or not result.complete:
            self.fail("the pickle's result is %s (expected a numpy array with its state)" % _describe(result))
        return result


# Protocol 5's out-of-band buffer opcodes, named here: Python 3.6's pickletools does not know them.
_OUT_OF_BAND = {0x97: "NEXT_BUFFER", 0x98: "READONLY_BUFFER"}

# opcode byte -> (name, lowest protocol that writes it, _Reader method; None for STOP)
_OPCODES = {
    0x80: ("PROTO", 2, "op_proto"),
    0x2e: ("STOP", 2, None),
    0x63: ("GLOBAL", 2, "op_global"),
    0x52: ("REDUCE", 2, "op_reduce"),
    0x62: ("BUILD", 2, "op_build"),
    0x28: ("MARK", 2, "op_mark"),
    0x74: ("TUPLE", 2, "op_tuple"),
    0x85: ("TUPLE1", 2, "op_tuple1"),
    0x86: ("TUPLE2", 2, "op_tuple2"),
    0x87: ("TUPLE3", 2, "op_tuple3"),
    0x4e: ("NONE", 2, "op_none"),
    0x88: ("NEWTRUE", 2, "op_newtrue"),
    0x89: ("NEWFALSE", 2, "op_newfalse"),
    0x4b: ("BININT1", 2, "op_binint1"),
    0x4d: ("BININT2", 2, "op_binint2"),
    0x4a: ("BININT", 2, "op_binint"),
    0x58: ("BINUNICODE", 2, "op_binunicode"),
    0x71: ("BINPUT", 2, "op_binput"),
    0x72: ("LONG_BINPUT", 2, "op_long_binput"),
    0x68: ("BINGET", 2, "op_binget"),
    0x6a: ("LONG_BINGET", 2, "op_long_binget"),
    0x43: ("SHORT_BINBYTES", 3, "op_short_binbytes"),
    0x42: ("BINBYTES", 3, "op_binbytes"),
    0x95: ("FRAME", 4, "op_frame"),
    0x93: ("STACK_GLOBAL", 4, "op_stack_global"),
    0x94: ("MEMOIZE", 4, "op_memoize"),
    0x8c: ("SHORT_BINUNICODE", 4, "op_short_binunicode"),
    0x8d: ("BINUNICODE8", 4, "op_binunicode8"),
    0x8e: ("BINBYTES8", 4, "op_binbytes8"),
    0x96: ("BYTEARRAY8", 5, "op_bytearray8"),
}


def loads_ndarray(data, dtype, shape):
    """The array a pickle payload holds, refused unless it is exactly numpy's pickle of a ``dtype`` ``shape`` array.

    ``data``: the payload (bytes, bytearray or memoryview; at most the frame size limit). ``dtype``: the frame
    metadata's dtype name (a key of :data:`DTYPE_NAMES`); ``shape``: its shape (1 to 6 positive ints), both already
    validated by the frame parser. Returns a writable, C-ordered array of that dtype in native byte order and that
    shape, independent of ``data``. Anything else raises :class:`ProtocolError` saying what and where.
    """
    if dtype not in DTYPE_NAMES:
        raise ProtocolError("pickle payload refused: the metadata's dtype %r has no accepted pickle form (accepted: "
                            "%s)" % (dtype, ", ".join(sorted(DTYPE_NAMES))))
    shape = tuple(int(d) for d in shape)
    array = _Reader(data, dtype, shape).run()
    wire = np.dtype(dtype)
    if array.dtype.endian in "<>":  # an allowed name and an endian character: never a dtype a peer described
        wire = wire.newbyteorder(array.dtype.endian)
    flat = np.frombuffer(array.data.view, dtype=wire)  # the length was checked: exactly prod(shape) items
    layout = flat.reshape(shape, order="F" if array.fortran else "C")
    return layout.astype(np.dtype(dtype), order="C")  # a copy: native order, writable, free of the payload
