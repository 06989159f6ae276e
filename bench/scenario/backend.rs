//! `longlink-bench backend`.

use std::io::{Read, Write};

use serde_json::json;

use crate::util::http_message;

/// `longlink-bench backend`: the bundled minimal upstream backend.
pub(crate) fn backend(listen: &str) -> Result<(), String> {
    let l = std::net::TcpListener::bind(listen).map_err(|e| format!("listen {listen}: {e}"))?;
    eprintln!(
        "backend listening on {}",
        l.local_addr().map_err(|e| e.to_string())?
    );
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut buf = Vec::with_capacity(8192);
            let mut chunk = [0u8; 8192];
            loop {
                // One request: the head, then Content-Length bytes.
                let (end, len) = loop {
                    if let Some(m) = http_message(&buf) {
                        break m;
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let body: serde_json::Value =
                    serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap_or_default();
                let answer = serde_json::to_vec(
                    &json!({"payload": body["payload"], "payload_type": "text"}),
                )
                .unwrap_or_default();
                buf.drain(..end + 4 + len);
                let mut resp = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", answer.len()).into_bytes();
                resp.extend_from_slice(&answer);
                if s.write_all(&resp).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}
