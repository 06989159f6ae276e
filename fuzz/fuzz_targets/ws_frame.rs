//! The WebSocket frame decoders (client frames; server frames as our client reads them),
//! unmasking, close-payload check and incremental UTF-8 validation: any bytes never panic;
//! header lengths stay within the input and the limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use longlink::ws;

fuzz_target!(|data: &[u8]| {
    let max = 1 << 16;
    let mut at = 0;
    let mut msg = Vec::new();
    let mut utf8 = ws::Utf8State::default();
    while at < data.len() {
        match ws::decode_header(&data[at..], max, data.first() == Some(&1)) {
            Ok(Some(h)) => {
                if !ws::op::is_control(h.opcode) {
                    assert!(h.payload_len <= max);
                }
                if data.len() - at < h.frame_len() {
                    break;
                }
                let payload = &data[at + h.header_len..at + h.frame_len()];
                match h.opcode {
                    ws::op::CLOSE => {
                        let mut p = Vec::new();
                        ws::unmask_into(payload, h.mask, &mut p);
                        let _ = ws::check_close(&p);
                    }
                    ws::op::TEXT | ws::op::CONTINUATION => {
                        ws::unmask_into(payload, h.mask, &mut msg);
                        if !utf8.feed(&msg, h.fin) || h.fin {
                            msg.clear();
                            utf8 = ws::Utf8State::default();
                        }
                    }
                    _ => {}
                }
                at += h.frame_len();
            }
            Ok(None) | Err(_) => break,
        }
    }
    // The same bytes as server frames (what `longlink client` reads): payload ranges stay
    // inside the input and the limit.
    let mut at = 0;
    while let Ok(Some(f)) = ws::decode_server_frame(&data[at..], max, data.first() == Some(&1)) {
        assert!(f.payload.end == f.len && f.len <= data.len() - at);
        assert!(f.payload.len() <= max);
        at += f.len;
    }
});
