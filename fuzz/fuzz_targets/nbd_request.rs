//! The pure NBD codec on arbitrary bytes: every parser must return an error
//! rather than panic, and whatever parses must re-encode to the same bytes
//! where the encoding is canonical.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::codec::{
    encode_info_request, encode_meta_request, encode_opt, encode_opt_reply, encode_request,
    parse_info_request, parse_meta_request, parse_opt_header, parse_opt_reply, parse_reply_header,
    parse_request, request_len, ReplyHeader,
};

fuzz_target!(|data: &[u8]| {
    // Transmission-phase request headers, compact (28 bytes) and extended (32).
    for extended in [false, true] {
        if let Ok(r) = parse_request(data, extended) {
            let n = request_len(extended);
            assert!(
                data.len() >= n,
                "parsed a request from {} bytes",
                data.len()
            );
            assert_eq!(
                encode_request(&r, extended),
                &data[..n],
                "request header does not round-trip (extended: {extended})"
            );
            if r.typ == nbd_proto::codec::CMD_WRITE {
                assert_eq!(r.payload, r.length, "WRITE payload differs from its length");
            } else if !extended {
                assert_eq!(r.payload, 0, "compact non-WRITE request with a payload");
            }
        }
    }

    // Option header (handshake phase) and option reply header.
    if let Ok(h) = parse_opt_header(data) {
        assert!(data.len() >= 16);
        assert_eq!(&encode_opt(h.option, &[])[..12], &data[..12]);
    }
    if let Ok((option, typ, _len)) = parse_opt_reply(data) {
        assert!(data.len() >= 20);
        assert_eq!(&encode_opt_reply(option, typ, &[])[..16], &data[..16]);
    }

    // NBD_OPT_INFO / NBD_OPT_GO bodies: the length is checked exactly, so a
    // successful parse re-encodes to the input.
    if let Ok((name, infos)) = parse_info_request(data) {
        assert_eq!(encode_info_request(&name, &infos), data);
    }
    // NBD_OPT_{LIST,SET}_META_CONTEXT bodies, likewise exact.
    if let Ok((name, queries)) = parse_meta_request(data) {
        let q: Vec<&str> = queries.iter().map(String::as_str).collect();
        assert_eq!(encode_meta_request(&name, &q), data);
    }

    // Reply headers as a client sees them.
    if let Ok((h, len)) = parse_reply_header(data) {
        assert!(
            len <= data.len(),
            "reply header of {len} bytes from {}",
            data.len()
        );
        match h {
            ReplyHeader::Simple { .. } => assert_eq!(len, 16),
            ReplyHeader::Chunk { .. } => assert!(len == 20 || len == 32),
        }
    }
});
