#!/usr/bin/env python3
"""Regenerates the hand-made seed inputs in fuzz/seeds/<target>/.

Run from anywhere: python3 fuzz/seeds/make_seeds.py. Every seed is small
(< 4 KiB) and named after what it exercises; see the input layout at the top
of each fuzz target.
"""
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
MASK = bytes([0x37, 0xFA, 0x21, 0x3D])


def frame(opcode, payload=b"", fin=True, mask=MASK, rsv=0, length=None):
    """A client frame; length forces 'min', 16 or 64 bit length encoding."""
    out = bytearray([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if mask is not None else 0
    n = len(payload)
    if length == 16 or (length is None and 126 <= n <= 0xFFFF):
        out += bytes([bit | 126]) + struct.pack(">H", n)
    elif length == 64 or (length is None and n > 0xFFFF):
        out += bytes([bit | 127]) + struct.pack(">Q", n)
    else:
        out += bytes([bit | n])
    if mask is not None:
        out += mask
        out += bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    else:
        out += payload
    return bytes(out)


def close(code, reason=b""):
    return frame(0x8, struct.pack(">H", code) + reason)


# Opcodes.
CONT, TEXT, BIN, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

STREAMS = {
    "rfc_hello": frame(TEXT, b"Hello"),
    "text_utf8": frame(TEXT, "héllo wörld €😀".encode()),
    "binary_126": frame(BIN, bytes(range(126))),
    "binary_300_16bit": frame(BIN, bytes(i % 251 for i in range(300))),
    "non_minimal_lengths": frame(BIN, b"abc", length=16) + frame(PING, b"hi", length=64),
    "fragmented_with_ping": frame(TEXT, b"Hel", fin=False) + frame(PING, b"ping")
    + frame(CONT, b"", fin=False) + frame(CONT, b"lo, ", fin=False) + frame(PONG)
    + frame(CONT, b"world") + frame(BIN, b"\x00", fin=False) + frame(CONT, b"\xff"),
    "utf8_split_across_fragments": frame(TEXT, "a😀".encode()[:3], fin=False)
    + frame(CONT, "a😀b".encode()[3:]),
    "invalid_utf8_fragment": frame(TEXT, b"ok\xc0\x80", fin=False),
    "truncated_utf8_final": frame(TEXT, b"\xf0\x9f\x98"),
    "close_normal": frame(PING, b"") + close(1000, b"bye"),
    "close_empty": frame(CLOSE),
    "close_one_byte": frame(CLOSE, b"\x03"),
    "close_invalid_code": close(1005),
    "close_1012": close(1012, b"restart"),
    "close_bad_reason": close(1000, b"\xff"),
    "unmasked": frame(TEXT, b"hi", mask=None),
    "reserved_bits": frame(TEXT, b"x", rsv=0x40),
    "reserved_opcode": frame(0x3, b"x"),
    "continuation_without_start": frame(CONT, b"x"),
    "data_inside_fragmented": frame(BIN, b"x", fin=False) + frame(TEXT, b"y"),
    "fragmented_ping": frame(PING, b"", fin=False),
    "control_too_long": frame(PONG, bytes(126)),
    "huge_length_header": bytes([0x82, 0xFF]) + struct.pack(">Q", 1 << 40) + MASK,
    "msb_length": bytes([0x82, 0xFF]) + struct.pack(">Q", (1 << 63) | 5),
    "incomplete_tail": frame(TEXT, b"done") + frame(BIN, bytes(200))[:50],
    "pings_and_pongs": frame(PING, b"a" * 125) + frame(PONG, b"b") + frame(PING),
}

# Limit index (low 3 bits) for streams that should hit the size limit.
LIMIT_HINT = {"binary_126": 2, "binary_300_16bit": 4, "control_too_long": 2, "pings_and_pongs": 2}


def write(target, name, data):
    assert len(data) < 4096, (target, name, len(data))
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def ws_seeds():
    for i, (name, stream) in enumerate(STREAMS.items()):
        limit = LIMIT_HINT.get(name, 7)  # 1 MiB unless hinted
        if i % 5 == 0 and name not in LIMIT_HINT:
            limit = 4  # 1000 bytes
        chunk = i % 8
        write("decode_frame", name, bytes([limit | chunk << 3, i]) + stream)
        write("differential", name, bytes([limit | (i % 4) << 3]) + stream)


GOOD_HEADERS = (
    b"Host: example.com\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)


def request(target=b"/ws", method=b"GET", version=b"HTTP/1.1", headers=GOOD_HEADERS):
    return method + b" " + target + b" " + version + b"\r\n" + headers + b"\r\n"


def handshake_seeds():
    seeds = {
        "rfc_sample": request(),
        "with_channels": request(b"/ws?channels=news,room:1/a-b_c.d@e&client_id=alice"),
        "raw_one_channel": request(b"/ws?channels=prices&format=raw"),
        "since": request(b"/ws?channels=news,room:1&since=news:abcd1234:41,room:1:k3v9x0qa:0"),
        "since_not_subscribed": request(b"/ws?channels=news&since=other:abcd1234:1"),
        "since_twice": request(b"/ws?channels=a&since=a:abcd1234:1,a:abcd1234:2"),
        "raw_two_channels": request(b"/ws?channels=a,b&format=raw"),
        "duplicate_channels": request(b"/ws?channels=a,a,,b&channels=b,c"),
        "percent_encoded": request(b"/ws?channels=room%3Alobby%2Cx&client_id=c%40d+e"),
        "bad_format": request(b"/ws?format=xml&channels=a"),
        "bad_client_id": request(b"/ws?client_id=&channels=a%20b"),
        "post": request(method=b"POST"),
        "http10": request(version=b"HTTP/1.0"),
        "no_connection": request(headers=GOOD_HEADERS.replace(b"Connection: keep-alive, Upgrade\r\n", b"")),
        "upgrade_h2c": request(headers=GOOD_HEADERS.replace(b"websocket", b"h2c")),
        "short_key": request(headers=GOOD_HEADERS.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"c2hvcnQ=")),
        "non_canonical_key": request(headers=GOOD_HEADERS.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"dGhlIHNhbXBsZSBub25jZR==")),
        "no_key": request(headers=GOOD_HEADERS.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"")),
        "version_8": request(headers=GOOD_HEADERS.replace(b"Version: 13", b"Version: 8")),
        "duplicate_key": request(headers=GOOD_HEADERS + b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
        "two_connection_headers": request(headers=GOOD_HEADERS.replace(b"Connection: keep-alive, Upgrade\r\n", b"Connection: keep-alive\r\nConnection: upgrade\r\n")),
        "lower_case_names": request(headers=GOOD_HEADERS.lower()),
        "many_channels": request(b"/ws?channels=" + b",".join(b"c%d" % i for i in range(140))),
    }
    for name, data in seeds.items():
        write("handshake", name, data)


def client_request_seeds():
    seeds = {
        "subscribe": b'{"type":"subscribe","channel":"news","id":1}',
        "unsubscribe": b'{"type":"unsubscribe","channel":"room:1/a","id":"x"}',
        "publish": b'{"type":"publish","channel":"room:1","data":{"a":[1,2.5,null,true]},"id":3}',
        "publish_no_data": b'{"type":"publish","channel":"c"}',
        "send": b'{"type":"send","to":"bob","data":"hi \\"there\\"","id":{"n":[1,2]}}',
        "escaped_channel": b'{"type":"subscribe","channel":"a\\/b\\u0063"}',
        "missing_type": b'{"channel":"a"}',
        "missing_channel": b'{"type":"subscribe"}',
        "missing_to": b'{"type":"send","data":1}',
        "unknown_type": b'{"type":"dance","id":null}',
        "invalid_channel": b'{"type":"subscribe","channel":"a b"}',
        "invalid_client_id": b'{"type":"send","to":""}',
        "not_object": b"[1]",
        "truncated": b'{"type":"subscribe",',
        "duplicate_field": b'{"type":"subscribe","type":"publish","channel":"a"}',
        # MAX_JSON_DEPTH = 126 for data and id, 127 for the whole request.
        "deep_data": b'{"type":"publish","channel":"a","data":' + b"[" * 126 + b"]" * 126 + b"}",
        "too_deep_data": b'{"type":"publish","channel":"a","data":' + b"[" * 127 + b"]" * 127 + b"}",
        "far_too_deep_data": b'{"type":"publish","channel":"a","data":' + b"[" * 129 + b"]" * 129 + b"}",
        "deep_id": b'{"type":"subscribe","channel":"c","id":' + b"[" * 126 + b"]" * 126 + b"}",
        "too_deep_id": b'{"type":"subscribe","channel":"c","id":' + b"[" * 127 + b"]" * 127 + b"}",
        "too_deep_unknown_field": b'{"type":"send","to":"b","x":' + b"{\"a\":" * 127 + b"1" + b"}" * 128,
        # serde_json errors may quote the input: not a depth error.
        "error_quotes_input": b'"recursion limit exceeded, nested deeper than 1 levels"',
        "brackets_in_strings": b'{"type":"publish","channel":"c","data":["\\\"' + b"[" * 200 + b'"],"id":"' + b"{" * 200 + b'"}',
        "unicode_id": '{"type":"subscribe","channel":"c","id":"é😀\\ud83d\\ude00"}'.encode(),
        "big_numbers": b'{"type":"publish","channel":"c","data":[1e400,-0,18446744073709551616],"id":1.5e3}',
    }
    for name, data in seeds.items():
        write("client_request", name, data)


def publish_body_seeds():
    seeds = {
        "json_object": b"\x01news\x00{\"a\":1,\"b\":[true,null]}",
        "json_declared_invalid": b"\x01news\x00{\"a\":",
        "json_string": b"\x03room%3A1\x00\"hello\"",
        # MAX_JSON_DEPTH = 126: the deepest body accepted as JSON.
        "json_deep_126": b"\x01c\x00" + b"[" * 126 + b"]" * 126,
        "json_deep_127": b"\x01c\x00" + b"[" * 127 + b"]" * 127,
        "json_deep_128": b"\x01c\x00" + b"[" * 128 + b"]" * 128,
        "json_deep_129": b"\x01c\x00" + b"[" * 129 + b"]" * 129,
        "json_brackets_in_string": b"\x01c\x00[\"" + b"[" * 200 + b"\"]",
        "json_escaped_quote_brackets": b"\x01c\x00{\"k\\\"[\":\"\\\\\\\"" + b"{" * 200 + b"\"}",
        "text": b"\x00news\x00hello \"world\" \\ \n\t\x01",
        "text_utf8": "\x02a/b\x00héllo € 😀".encode(),
        "text_looks_json": b"\x00c\x00{\"not\":\"declared\"}",
        "binary": b"\x00c\x00\xff\xfe\x00\x01\xc3",
        "binary_from": b"\x06c\x00\x80abc",
        "empty_body": b"\x00c\x00",
        "empty_json": b"\x01c\x00",
        "percent_segment": b"\x00room%3Alobby%2Fx\x00hi",
        "invalid_segment": b"\x00a%20b\x00hi",
        "bad_percent": b"\x00%zz%4\x00hi",
        "non_utf8_percent": b"\x00%ff%c3\x00x",
        "long_text": b"\x00c\x00" + b"x" * 300,
        "long_binary": b"\x00c\x00" + bytes(range(256)) * 2,
    }
    for name, data in seeds.items():
        write("publish_body", name, data)


def mask_seeds():
    seeds = {
        "zero_mask": bytes(4) + b"hello world",
        "ones_mask": b"\xff" * 4 + bytes(range(40)),
        "rfc_mask_hello": MASK + b"Hello",
        "empty": MASK,
        "one_byte": b"\x12\x34\x56\x78" + b"a",
        "seven_bytes": b"\x01\x00\x00\x80" + b"abcdefg",
        "long": b"\xa5\x5a\xc3\x3c" + bytes(i * 31 % 256 for i in range(1000)),
    }
    for name, data in seeds.items():
        write("mask", name, data)


def token_seeds():
    import base64
    import json

    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    far = 4102444800  # 2100-01-01
    signed = {
        "signed_full": {"sub": "alice", "exp": far, "channels": ["news", "user:42:*"],
                        "publish": ["chat:*"], "send": ["bob"]},
        "signed_no_sub": {"exp": far},
        "signed_bad_pattern": {"sub": "a", "exp": far, "channels": ["a*b", ""]},
        "signed_exp_string": {"sub": "a", "exp": "x"},
        "signed_expired": {"sub": "a", "exp": 1},
    }
    for name, claims in signed.items():
        write("token", name, b"\x01" + json.dumps(claims).encode())
    none = b64(b'{"alg":"none"}') + b"." + b64(json.dumps({"sub": "a", "exp": far}).encode())
    write("token", "raw_alg_none", b"\x00" + none + b".")
    write("token", "raw_garbage", b"\x00a.b.c")
    write("token", "raw_empty_parts", b"\x00..")


def history_query_seeds():
    seeds = {
        "empty": b"",
        "limit": b"limit=2",
        "since": b"since=5&epoch=abcd1234",
        "all": b"since=0&epoch=k3v9x0qa&limit=1000",
        "since_alone": b"since=5",
        "bad_epoch": b"since=1&epoch=ABCD1234",
        "repeated": b"limit=1&limit=2",
        "unknown": b"page=2",
        "escaped": b"since=%35&epoch=abcd%31234",
        "plus": b"since=+5&epoch=abcd1234",
    }
    for name, data in seeds.items():
        write("history_query", name, data)


def wire_body(kind, sender, payload):
    """A cluster wire body: version 1, payload kind, sender length, sender, payload."""
    return bytes([1, kind, len(sender)]) + sender + payload


def broker_wire_seeds():
    body = wire_body
    seeds = {
        "channel_json": b"\x01" + b"abcd1234:42:1764000000000:" + body(0, b"", b'{"a":[1,2]}'),
        "channel_text_from": b"\x01" + b"k3v9x0qa:7:1:" + body(1, b"alice", b"hi: there"),
        "channel_binary": b"\x01" + b"zzzzzzzz:18446744073709551615:0:" + body(2, b"", b"\x00\xff:\x01"),
        "bad_epoch": b"\x01" + b"ABCD1234:1:1:" + body(1, b"", b"x"),
        "direct_json_from": b"\x00" + body(0, b"bob", b'"psst"'),
        "broadcast_binary": b"\x00" + body(2, b"", b""),
        "leading_zero_offset": b"\x01" + b"abcd1234:007:1:" + body(1, b"", b"x"),
        "offset_overflow": b"\x01" + b"abcd1234:18446744073709551616:1:" + body(1, b"", b"x"),
        "bad_version": b"\x00" + bytes([9, 0, 0]) + b"1",
        "from_too_long": b"\x00" + bytes([1, 1, 200]) + b"a" * 10,
        "invalid_json": b"\x00" + body(0, b"", b'{"a":'),
        "deep_json": b"\x00" + body(0, b"", b"[" * 130 + b"]" * 130),
        "build_json": bytes([0b0001]) + b"\x01" + bytes(7) + b'{"k":"v"}',
        "build_text_from": bytes([0b1011]) + b"\x05" + bytes(7) + "h\u00e9llo".encode(),
        "build_binary": bytes([0b0100]) + b"\xff\xfe\x00",
    }
    for name, data in seeds.items():
        write("broker_wire", name, data)


def last_event_id_seeds():
    epoch_bytes = b"k3j9x0ab"
    seeds = {
        "one_channel": b"\x01" + b"7rn1tq.k3j9x0ab-12",
        "two_channels": b"\x02" + b"21ay7s.k3j9x0ab-12.p0o1ax9z-0",
        "no_channels": b"\x00" + b"j4ux45",
        "largest_offset": b"\x01" + b"7rn1tq.zzzzzzzz-18446744073709551615",
        "offset_overflow": b"\x01" + b"7rn1tq.zzzzzzzz-18446744073709551616",
        "leading_zero": b"\x01" + b"7rn1tq.k3j9x0ab-012",
        "wrong_count": b"\x01" + b"21ay7s.k3j9x0ab-12.p0o1ax9z-0",
        "other_tag": b"\x02" + b"000000.k3j9x0ab-1.p0o1ax9z-2",
        "short_epoch": b"\x01" + b"7rn1tq.k3j9x0a-1",
        "upper_case": b"\x01" + b"7RN1TQ.K3J9X0AB-1",
        "trailing_dot": b"\x01" + b"7rn1tq.k3j9x0ab-1.",
        "build_three": b"\x03" + (epoch_bytes + bytes(range(8))) * 3,
    }
    for name, data in seeds.items():
        write("last_event_id", name, data)


if __name__ == "__main__":
    for target in ["decode_frame", "differential", "handshake", "client_request", "publish_body", "mask", "token", "broker_wire", "history_query", "last_event_id"]:
        shutil.rmtree(os.path.join(HERE, target), ignore_errors=True)
    ws_seeds()
    handshake_seeds()
    client_request_seeds()
    publish_body_seeds()
    mask_seeds()
    token_seeds()
    broker_wire_seeds()
    history_query_seeds()
    last_event_id_seeds()
