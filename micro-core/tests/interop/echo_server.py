#!/usr/bin/env python3
"""echo.proto's Echo service on Python's grpcio (gRPC C-core), for the SDK's interop tests.

No generated code: requests and replies are encoded here by hand (test-proto/echo.proto:
Message{text=1, delay_ms=2, fail=3}, Reply{text=1, instance=2}). Each reply's `instance`
is the caller's connection as this server sees it (`context.peer()`), so a test can tell
whether its calls shared one connection. `delay_ms` sleeps first; `fail` answers
FAILED_PRECONDITION. The server keeps gRPC's default keepalive policy (a ping without
calls allowed every 5 minutes, GOAWAY after two strikes). Prints `listening on PORT`
once it serves on 127.0.0.1; runs until killed.
"""

import sys
import time
from concurrent import futures

import grpc


def read_varint(data, at):
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def parse_message(data):
    fields, at = {}, 0
    while at < len(data):
        key, at = read_varint(data, at)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            fields[number], at = read_varint(data, at)
        elif wire_type == 2:
            length, at = read_varint(data, at)
            fields[number] = data[at:at + length]
            at += length
        else:
            raise ValueError(f"unexpected wire type {wire_type}")
    return fields.get(1, b"").decode(), fields.get(2, 0), bool(fields.get(3, 0))


def string_field(number, text):
    encoded = text.encode()
    return varint(number << 3 | 2) + varint(len(encoded)) + encoded


def answer(request, context):
    text, delay_ms, fail = parse_message(request)
    if delay_ms:
        time.sleep(delay_ms / 1000)
    if fail:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
    return string_field(1, text) + string_field(2, context.peer())


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    methods = {
        "Say": grpc.unary_unary_rpc_method_handler(answer),
        "Record": grpc.unary_unary_rpc_method_handler(answer),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
