//! `longlink-bench rooms`.

use std::time::Instant;

use serde_json::json;

use crate::util::{gateway_pid, http, rss, KeepAlive};
use crate::Common;

pub(crate) fn room_memory(c: &Common, members: usize, rooms: usize) -> Result<(), String> {
    let pid = gateway_pid(c)?;
    let tag = format!("m{}-", std::process::id());
    let ids: Vec<String> = (0..members)
        .map(|i| format!("{tag}device-{i:08}"))
        .collect();
    let mut ka = KeepAlive::new(&c.api)?;
    let each = |ka: &mut KeepAlive, method: &str| -> Result<f64, String> {
        let t0 = Instant::now();
        for r in 0..rooms {
            for chunk in ids.chunks(10_000) {
                let path = format!("/v1/rooms/{}/{tag}room-{r}/members", c.app);
                let body = json!({ "device_ids": chunk }).to_string();
                if method == "POST" {
                    ka.post(&path, body.as_bytes())?;
                } else {
                    let (st, b) = http(&c.api, "DELETE", &path, body.as_bytes())?;
                    if st != 200 {
                        return Err(format!(
                            "DELETE {path}: {st} {}",
                            String::from_utf8_lossy(&b)
                        ));
                    }
                }
            }
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    let rss0 = rss(pid)?;
    let bind_s = each(&mut ka, "POST")?;
    let rss1 = rss(pid)?;
    let (st, b) = http(
        &c.api,
        "GET",
        &format!("/v1/rooms/{}/{tag}room-0", c.app),
        b"",
    )?;
    let info: serde_json::Value = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
    if st != 200 || info["member_count"].as_u64() != Some(members as u64) {
        return Err(format!(
            "room info: {st} member_count {}",
            info["member_count"]
        ));
    }
    let unbind_s = each(&mut ka, "DELETE")?;
    let rss2 = rss(pid)?;
    let per = (rss1 as f64 - rss0 as f64) / (members * rooms) as f64;
    let v = json!({
        "scenario": "rooms", "members": members, "rooms": rooms,
        "rss_before_kib": rss0 / 1024, "rss_bound_kib": rss1 / 1024, "rss_unbound_kib": rss2 / 1024,
        "rss_per_membership_bytes": per.round(),
        "bind_per_s": ((members * rooms) as f64 / bind_s).round(), "unbind_per_s": ((members * rooms) as f64 / unbind_s).round(),
    });
    println!("{v}");
    println!("\n  rooms  {members} members × {rooms} room(s)");
    println!("  RSS before         {:>10} KiB", rss0 / 1024);
    println!("  RSS bound          {:>10} KiB", rss1 / 1024);
    println!("  RSS per membership {per:>10.0} bytes");
    println!("  RSS after unbind   {:>10} KiB", rss2 / 1024);
    println!(
        "  bind / unbind      {:>10.0} / {:.0} memberships/s",
        (members * rooms) as f64 / bind_s,
        (members * rooms) as f64 / unbind_s
    );
    Ok(())
}
