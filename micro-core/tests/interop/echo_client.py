#!/usr/bin/env python3
"""A grpcio (gRPC C-core) client of echo.proto that finds its server by name in Consul.

Usage: echo_client.py CONSUL_HTTP_ADDRESS SERVICE_NAME. Asks Consul's health API for a
passing instance of SERVICE_NAME, then calls /echo.Echo/Say three times, printing one
JSON line each: a plain call (its reply's text and instance), a call asking the server to
fail (the status code and details), and a call of 3 s under a 300 ms deadline (the status
code). No generated code: messages are encoded here by hand.
"""

import json
import sys
import urllib.request

import grpc


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


def read_varint(data, at):
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def message(text, delay_ms=0, fail=False):
    encoded = text.encode()
    out = varint(1 << 3 | 2) + varint(len(encoded)) + encoded
    if delay_ms:
        out += varint(2 << 3) + varint(delay_ms)
    if fail:
        out += varint(3 << 3) + varint(1)
    return out


def reply(data):
    fields, at = {}, 0
    while at < len(data):
        key, at = read_varint(data, at)
        length, at = read_varint(data, at)
        fields[key >> 3] = data[at:at + length].decode()
        at += length
    return {"text": fields.get(1, ""), "instance": fields.get(2, "")}


def main(consul, name):
    url = f"http://{consul}/v1/health/service/{name}?passing"
    with urllib.request.urlopen(url, timeout=5) as answer:
        entries = json.load(answer)
    if not entries:
        print(json.dumps({"error": f"no passing instance of {name} in Consul at {consul}"}), flush=True)
        return 1
    service = entries[0]["Service"]
    channel = grpc.insecure_channel(f"{service['Address']}:{service['Port']}")
    say = channel.unary_unary("/echo.Echo/Say")
    print(json.dumps({"call": "plain", **reply(say(message("from python"), timeout=5))}), flush=True)
    for call, request, timeout in [
        ("fail", message("refuse", fail=True), 5),
        ("slow", message("slow", delay_ms=3000), 0.3),
    ]:
        try:
            say(request, timeout=timeout)
            print(json.dumps({"call": call, "code": "OK"}), flush=True)
        except grpc.RpcError as err:
            print(json.dumps({"call": call, "code": err.code().name, "details": err.details()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
