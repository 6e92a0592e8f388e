//! The status as text: a header, the Mullvad daemon's state, then per tunnel interface its
//! MTUs, one row per peer (columns of fixed width, see [`columns`]) with the peer's details
//! indented below, the interface's drops and leaks, and its problems, one `!` line each
//! saying what it means or what to do; last, drops and leaks no table covered.

use std::fmt::Write as _;

use super::format::{
    BOLD, CYAN, DIM, GREEN, RED, abbrev, cell, fmt_age, fmt_bytes, fmt_secs, fmt_utc, pack, paint,
    truncate, wrap,
};
use crate::serve::status::doc::{MeanTime, Mullvad, MullvadLocation, Peer, StatusDoc, TransitLoss};

/// Handshakes older than this mean the session is gone (WireGuard rejects after 180 s).
const STALE_HANDSHAKE_S: f64 = 180.0;
/// Counter-gap loss at or above this is reported.
const LOSS_WARN_PERCENT: f64 = 1.0;

pub(super) fn header_line(time: u64, healthy: Option<(bool, Option<&str>)>, color: bool) -> String {
    let mut s = format!("wirescope status  {}", fmt_utc(time));
    match healthy {
        Some((true, _)) => {
            s.push_str("  agent ");
            s.push_str(&paint("healthy", GREEN, color));
        }
        Some((false, _)) => {
            s.push_str("  agent ");
            s.push_str(&paint("UNHEALTHY", RED, color));
        }
        None => {}
    }
    paint(&s, BOLD, color)
}

/// Column widths of the peer rows (after a 2-space indent): 78 columns in all.
const COLS: [(&str, usize); 7] = [
    ("hop", 3),
    ("via", 10),
    ("peer", 10),
    ("name", 14),
    ("handshake", 10),
    ("hs RTT", 9),
    ("probe RTT/loss", 14),
];

/// A peer row (or the column header) cut back into its trimmed cells, by the fixed widths:
/// what a script reading the table can rely on.
pub fn columns(line: &str) -> Vec<String> {
    let chars: Vec<char> = line.chars().collect();
    let mut at = 2;
    let mut out = Vec::new();
    for (i, (_, w)) in COLS.iter().enumerate() {
        let end = if i + 1 == COLS.len() {
            chars.len()
        } else {
            (at + w).min(chars.len())
        };
        let c: String = chars
            .get(at.min(chars.len())..end)
            .unwrap_or(&[])
            .iter()
            .collect();
        out.push(c.trim().to_string());
        at = end + 1;
    }
    out
}

fn row(cells: &[String]) -> String {
    let mut s = String::from("  ");
    for (i, (c, (_, w))) in cells.iter().zip(COLS.iter()).enumerate() {
        if i + 1 == COLS.len() {
            s.push_str(&truncate(c, *w));
        } else {
            s.push_str(&cell(c, *w));
            s.push(' ');
        }
    }
    s.trim_end().to_string()
}

/// One peer's row, its detail lines, and its problems.
fn peer_block(p: &Peer, underlays: &[String]) -> (String, Vec<String>, Vec<String>) {
    let short = abbrev(&p.public_key);
    let hop = p.hop.to_string();
    let via = p.via.as_str();
    let via = if via.is_empty() {
        "-".to_string()
    } else if underlays.iter().any(|u| u == via) || via.chars().count() <= 10 {
        via.to_string()
    } else {
        abbrev(via)
    };
    let relay = p.mullvad_relay.as_ref();
    let name = p
        .friendly_name
        .clone()
        .or_else(|| relay.map(|r| r.hostname.clone()))
        .unwrap_or_else(|| "-".into());
    let age = p.latest_handshake_age_seconds;
    let hs = age.map_or("never".into(), fmt_age);
    let hs_rtt = p
        .handshake_rtt
        .map_or("-".into(), |r| fmt_secs(r.mean_seconds));
    let probes = &p.probes;
    let probe = {
        let (mut sent, mut lost, mut sum, mut replies) = (0u64, 0u64, 0.0f64, 0u64);
        for pr in probes {
            sent += pr.sent;
            lost += pr.lost;
            if let Some(m) = pr.rtt_mean_seconds {
                sum += m * pr.replies as f64;
                replies += pr.replies;
            }
        }
        if sent == 0 {
            "-".to_string()
        } else {
            let rtt = if replies > 0 {
                fmt_secs(sum / replies as f64)
            } else {
                "-".into()
            };
            format!("{rtt} {:.1}%", lost as f64 * 100.0 / sent as f64)
        }
    };
    let line = row(&[hop, via, short.clone(), name, hs.clone(), hs_rtt, probe]);

    let mut items = Vec::new();
    if let Some(Some(e)) = &p.endpoint {
        items.push(format!("endpoint {e}"));
    }
    for (dir, t) in [("tx", &p.traffic.tx), ("rx", &p.traffic.rx)] {
        let mut s = format!(
            "{dir} {} pkt {}",
            t.tunnel.packets,
            fmt_bytes(t.tunnel.bytes)
        );
        if let Some(o) = &t.overhead {
            let _ = write!(
                s,
                " overhead {:.1} B/pkt {} {:.1}%",
                o.bytes_per_packet,
                fmt_bytes(o.bytes),
                o.percent
            );
        }
        items.push(s);
    }
    let TransitLoss {
        gaps,
        late,
        loss_percent: loss,
        ..
    } = p.transit_loss;
    items.push(format!(
        "gaps {gaps} late {late} loss {}",
        loss.map_or("-".into(), |l| format!("{l:.2}%"))
    ));
    let tt = |t: Option<MeanTime>| t.map(|t| fmt_secs(t.mean_seconds));
    if let (tx, rx) = (tt(p.transit_time.tx), tt(p.transit_time.rx))
        && (tx.is_some() || rx.is_some())
    {
        items.push(format!(
            "transit tx {} rx {}",
            tx.unwrap_or("-".into()),
            rx.unwrap_or("-".into())
        ));
    }
    let timeouts = p.handshake_timeouts;
    if timeouts > 0 {
        items.push(format!("hs timeouts {timeouts}"));
    }
    if let Some(m) = p.path_mtu_bytes {
        items.push(format!("path MTU {m}"));
    }
    match p.path_healthy {
        Some(true) => items.push("path healthy".into()),
        Some(false) => items.push("path UNHEALTHY".into()),
        None => {}
    }
    if let Some(r) = relay {
        let mut s = format!("relay {} {}", r.role, r.hostname);
        if !r.city.is_empty() {
            let _ = write!(s, " ({})", r.city);
        }
        items.push(s);
    }
    for pr in probes {
        let target = pr.target.as_deref().unwrap_or("?");
        let mut s = format!("probe {target} sent {} lost {}", pr.sent, pr.lost);
        if let Some(l) = pr.recent.rtt_last_seconds {
            let _ = write!(s, " last {}", fmt_secs(l));
        }
        items.push(s);
    }

    let mut problems = Vec::new();
    match age {
        None => problems.push(format!(
            "{short} no handshake yet: peer unreachable or keys wrong"
        )),
        Some(a) if a > STALE_HANDSHAKE_S => problems.push(format!(
            "{short} handshake {hs} old: peer unreachable or keys wrong"
        )),
        _ => {}
    }
    if timeouts > 0 {
        problems.push(format!(
            "{short} {timeouts} handshake initiations unanswered: check the endpoint and firewall"
        ));
    }
    if let Some(l) = loss.filter(|l| *l >= LOSS_WARN_PERCENT) {
        problems.push(format!(
            "{short} {l:.1}% of messages lost on the way ({gaps} gaps, {late} late): lossy path"
        ));
    }
    for pr in probes {
        if let Some(l) = pr.recent.loss_percent.filter(|l| *l > 0.0) {
            problems.push(format!(
                "{short} probe loss {l:.1}% to {} in the last minute: lossy path or target down",
                pr.target.as_deref().unwrap_or("?")
            ));
        }
    }
    if p.path_healthy == Some(false) {
        problems.push(format!(
            "{short} path unhealthy: RTT, loss or handshake age beyond the failover thresholds"
        ));
    }
    (line, pack(&items, 6), problems)
}

/// Drops of `iface` as `iface REASON n, REASON n`.
fn drops_of(v: &StatusDoc, iface: &str) -> Option<String> {
    let d = v.drops.iter().find(|d| d.interface == iface)?;
    let reasons: Vec<String> = d
        .top_reasons
        .iter()
        .map(|r| format!("{} {}", r.reason, r.packets))
        .collect();
    let name = if iface.is_empty() {
        "(no device)"
    } else {
        iface
    };
    Some(format!("{name}: {}", reasons.join(", ")))
}

/// Leaks on `iface` as (total packets, `dns 3 ipv4 2`).
fn leaks_of(v: &StatusDoc, iface: &str) -> (u64, String) {
    let mut total = 0;
    let mut parts = Vec::new();
    for l in v.leaks.iter().filter(|l| l.interface == iface) {
        let n = l.packets;
        if n > 0 {
            total += n;
            parts.push(format!("{} {n}", l.kind));
        }
    }
    (total, parts.join(" "))
}

/// The Mullvad daemon's lines: state, relays and features when up; why not when not.
fn mullvad_lines(
    m: &Mullvad,
    out: &mut Vec<String>,
    problem: &dyn Fn(&mut Vec<String>, &str),
    color: bool,
) {
    let Some(c) = m.connection.as_ref().filter(|_| m.up) else {
        problem(
            out,
            &format!(
                "Mullvad daemon unreadable: {}",
                m.error.as_deref().unwrap_or("no reason given")
            ),
        );
        return;
    };
    let state = m.state.as_deref().unwrap_or("?");
    let relay = |r: &Option<MullvadLocation>| -> Option<String> {
        let r = r.as_ref()?;
        let h = r.hostname.as_deref()?;
        Some(match r.city.as_deref().filter(|c| !c.is_empty()) {
            Some(c) => format!("{h} ({c})"),
            None => h.to_string(),
        })
    };
    let mut items = vec![format!("Mullvad {state}")];
    match (relay(&c.entry), relay(&c.exit)) {
        (Some(e), Some(x)) => items.push(format!("{e} -> {x}")),
        (None, Some(x)) => items.push(x),
        _ => {}
    }
    if !c.features.is_empty() {
        items.push(c.features.join(", "));
    }
    for l in pack(&items, 0) {
        out.push(paint(&l, CYAN, color));
    }
    if state == "error" {
        problem(
            out,
            &format!(
                "Mullvad is in the error state: {}",
                m.error.as_deref().unwrap_or("no cause given")
            ),
        );
    } else if state != "connected" {
        problem(
            out,
            &format!("Mullvad is {state}: no traffic goes through its tunnel"),
        );
    }
}

/// The whole status as text, every line at most [`WIDTH`] columns (colour codes aside).
pub fn render(v: &StatusDoc, color: bool) -> String {
    let mut out: Vec<String> = Vec::new();
    let problem = |out: &mut Vec<String>, text: &str| {
        for l in wrap(&format!("! {text}"), 2, 4) {
            out.push(paint(&l, RED, color));
        }
    };
    let healthy = v.healthy;
    out.push(header_line(
        v.time,
        Some((healthy, v.health_reason.as_deref())),
        color,
    ));
    if !healthy {
        problem(
            &mut out,
            &format!(
                "agent unhealthy: {}",
                v.health_reason.as_deref().unwrap_or("no reason given")
            ),
        );
    }
    if let Some(m) = &v.mullvad {
        mullvad_lines(m, &mut out, &problem, color);
    }
    let underlays: Vec<String> = v.underlays.iter().map(|u| u.interface.clone()).collect();
    let mut shown: Vec<String> = Vec::new();
    if v.tunnels.is_empty() {
        out.push(String::new());
        out.push("no WireGuard interface is watched".into());
    }
    for t in &v.tunnels {
        let name = t.interface.as_str();
        let mtu = t.mtu;
        let mut peers: Vec<&Peer> = t.peers.iter().collect();
        // A stable order from one redraw to the next: by hop, then key.
        peers.sort_by_key(|p| (p.hop, p.public_key.clone()));
        out.push(String::new());
        let head = format!(
            "{name}  {}  port {}  {} peer{}",
            t.backend,
            t.listen_port,
            peers.len(),
            if peers.len() == 1 { "" } else { "s" }
        );
        for l in pack(&[head], 0) {
            out.push(paint(&l, BOLD, color));
        }
        let path_mtu = t.path_mtu_bytes;
        let rec = t.recommended_mtu;
        let mut mtus = vec![format!("MTU {mtu}")];
        mtus.push(format!(
            "path MTU {}",
            path_mtu.map_or("not measured".to_string(), |p| p.to_string())
        ));
        if let Some(r) = rec {
            mtus.push(format!("recommended {r}"));
        }
        out.extend(pack(&mtus, 2));
        let names: Vec<String> = COLS.iter().map(|(n, _)| n.to_string()).collect();
        out.push(paint(&row(&names), DIM, color));
        let mut problems = Vec::new();
        let mut vias: Vec<String> = Vec::new();
        for p in &peers {
            let (line, details, probs) = peer_block(p, &underlays);
            out.push(line);
            out.extend(details);
            problems.extend(probs);
            if underlays.contains(&p.via) && !vias.contains(&p.via) {
                vias.push(p.via.clone());
            }
        }
        // The interface's own drops and leaks, and those of the underlays it uses.
        let mut ifaces = vec![name.to_string()];
        ifaces.extend(vias.iter().cloned());
        let drops: Vec<String> = ifaces.iter().filter_map(|i| drops_of(v, i)).collect();
        out.extend(wrap(
            &format!(
                "drops {}",
                if drops.is_empty() {
                    "none".to_string()
                } else {
                    drops.join("; ")
                }
            ),
            2,
            8,
        ));
        let mut leak_parts = Vec::new();
        for u in &vias {
            let (n, text) = leaks_of(v, u);
            if n > 0 {
                leak_parts.push(format!("{u}: {text}"));
                problems.push(format!(
                    "{n} packets left {u} outside the tunnel ({text}): add a kill switch or fix the routes"
                ));
            } else {
                leak_parts.push(format!("{u}: none"));
            }
        }
        if !leak_parts.is_empty() {
            out.extend(wrap(&format!("leaks {}", leak_parts.join("; ")), 2, 8));
        }
        shown.extend(ifaces.iter().cloned());
        // MTU against the measured path.
        if let Some(r) = rec
            && r < mtu
        {
            problems.push(match path_mtu {
                Some(p) => format!(
                    "path MTU {p} < tunnel MTU {mtu} + {}: set MTU {r}",
                    p.saturating_sub(r)
                ),
                None => format!("tunnel MTU {mtu} above the path's: set MTU {r}"),
            });
        }
        for f in &v.path.fragments {
            let i = f.interface.as_str();
            let n = f.packets;
            if n > 0 && f.layer == "outer" && ifaces.iter().any(|x| x == i) {
                problems.push(format!(
                    "{n} WireGuard packet fragments {} on {i}: lower the tunnel MTU{}",
                    if f.direction == "rx" { "in" } else { "out" },
                    rec.map_or(String::new(), |r| format!(" to {r}"))
                ));
            }
        }
        for r in &v.path.icmp_reported_mtu {
            let i = r.interface.as_str();
            if ifaces.iter().any(|x| x == i) {
                problems.push(format!(
                    "ICMP too-big on {i} reports a path MTU of {}: packets above it are dropped",
                    r.bytes
                ));
            }
        }
        for u in &v.udp_receive_errors {
            if u.interface.as_deref() == Some(name) && u.errors > 0 {
                problems.push(format!(
                    "{} UDP receive errors on port {}: socket buffer full, raise net.core.rmem_max",
                    u.errors, u.port
                ));
            }
        }
        for pr in problems {
            problem(&mut out, &pr);
        }
    }
    // Whatever no table showed: drops elsewhere, leaks on other underlays.
    let mut rest = Vec::new();
    for d in &v.drops {
        let i = d.interface.as_str();
        if !shown.iter().any(|s| s == i)
            && let Some(s) = drops_of(v, i)
        {
            rest.push(s);
        }
    }
    let mut rest_problems = Vec::new();
    for u in &underlays {
        if shown.iter().any(|s| s == u) {
            continue;
        }
        let (n, text) = leaks_of(v, u);
        if n > 0 {
            rest_problems.push(format!(
                "{n} packets left {u} outside the tunnel ({text}): add a kill switch or fix the routes"
            ));
        }
    }
    if !rest.is_empty() || !rest_problems.is_empty() {
        out.push(String::new());
        out.push(paint("other interfaces", BOLD, color));
        if !rest.is_empty() {
            out.extend(wrap(&format!("drops {}", rest.join("; ")), 2, 8));
        }
        for p in rest_problems {
            problem(&mut out, &p);
        }
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::ops::status::format::WIDTH;

    const EXIT: &str = "aAg5tydAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const ENTRY: &str = "FXUjJ9fcAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn traffic(pk: u64, bytes: u64, ovh: Option<(u64, f64, f64)>) -> Value {
        let overhead = ovh.map_or(
            Value::Null,
            |(b, bpp, pct)| json!({"bytes": b, "bytes_per_packet": bpp, "percent": pct}),
        );
        json!({"tunnel": {"packets": pk, "bytes": bytes}, "wire_data": {"packets": pk, "bytes": bytes}, "overhead": overhead})
    }

    /// A multihop client: a healthy entry relay and a troubled exit relay, a tunnel MTU
    /// above the path's, leaks on the underlay, drops, Mullvad connected; decoded as
    /// `wirescope status` decodes the agent's answer (it lacks fields, as an older agent's).
    fn fixture() -> StatusDoc {
        serde_json::from_value(fixture_json()).expect("the fixture decodes")
    }

    fn fixture_json() -> Value {
        let entry = json!({
            "public_key": ENTRY, "friendly_name": null, "hop": 1, "via": "eth0",
            "allowed_ips": "10.0.0.2/32", "endpoint": "198.51.100.7:51820",
            "latest_handshake_age_seconds": 12.4,
            "rx_bytes": 1, "tx_bytes": 2,
            "traffic": {
                "tx": traffic(200, 37_600, Some((12_800, 64.0, 34.04))),
                "rx": traffic(200, 37_600, Some((12_800, 64.0, 34.04))),
            },
            "handshake_rtt": {"count": 1, "mean_seconds": 0.00058},
            "handshake_timeouts": 0,
            "transit_loss": {"gaps": 0, "late": 0, "rx_data_packets": 200, "loss_percent": 0.0},
            "transit_time": {"tx": {"count": 200, "mean_seconds": 0.000115}, "rx": null},
            "probes": [],
            "path_mtu_bytes": 1400,
            "path_healthy": true,
            "mullvad_relay": {"role": "entry", "hostname": "de-fra-wg-001", "country": "Germany", "city": "Frankfurt"},
        });
        let exit = json!({
            "public_key": EXIT, "friendly_name": "a-very-long-friendly-name", "hop": 2, "via": ENTRY,
            "allowed_ips": "0.0.0.0/0", "endpoint": "203.0.113.9:51820",
            "latest_handshake_age_seconds": 312.2,
            "rx_bytes": 1, "tx_bytes": 2,
            "traffic": {
                "tx": traffic(123_456_789, 98_765_432_100, Some((7_000_000_000, 56.7, 7.09))),
                "rx": traffic(0, 0, None),
            },
            "handshake_rtt": null,
            "handshake_timeouts": 3,
            "transit_loss": {"gaps": 30, "late": 2, "rx_data_packets": 1000, "loss_percent": 2.72},
            "transit_time": {"tx": null, "rx": null},
            "probes": [{"target": "10.64.0.1", "interface": "wg0-mullvad", "sent": 20, "lost": 2, "replies": 18,
                        "loss_percent": 10.0, "rtt_mean_seconds": 0.0421,
                        "recent": {"window_seconds": 60, "sent": 12, "lost": 1, "loss_percent": 8.33,
                                   "rtt_mean_seconds": 0.04, "rtt_last_seconds": 0.039}}],
            "path_mtu_bytes": null,
            "path_healthy": false,
            "mullvad_relay": {"role": "exit", "hostname": "se-got-wg-101", "country": "Sweden", "city": "Gothenburg"},
        });
        json!({
            "time": 1_790_000_000u64,
            "healthy": true,
            "health_reason": null,
            "export_endpoints": true,
            "tunnels": [{
                "interface": "wg0-mullvad", "ifindex": 5, "mtu": 1420, "listen_port": 51820,
                "backend": "netlink", "path_mtu_bytes": 1400, "recommended_mtu": 1340,
                "peers": [
                    entry, exit,
                ],
            }],
            "underlays": [{"interface": "eth0", "ifindex": 2}],
            "drops": [
                {"interface": "lo", "packets": 199, "top_reasons": [{"reason": "SOCKET_RCVBUFF", "packets": 199}]},
                {"interface": "wg0-mullvad", "packets": 16, "top_reasons": [{"reason": "NO_SOCKET", "packets": 9}, {"reason": "NETFILTER_DROP", "packets": 7}]},
            ],
            "udp_receive_errors": [{"port": 51820, "errors": 3, "wireguard": true, "interface": "wg0-mullvad"}],
            "leaks": [
                {"interface": "eth0", "kind": "dns", "packets": 3, "bytes": 180},
                {"interface": "eth0", "kind": "ipv4", "packets": 0, "bytes": 0},
            ],
            "path": {"mtu": [], "fragments": [{"interface": "eth0", "direction": "tx", "layer": "outer", "packets": 4}],
                     "icmp_too_big": [], "icmp_reported_mtu": []},
            "mullvad": {"up": true, "state": "connected", "error": null,
                        "exit": {"hostname": "se-got-wg-101", "city": "Gothenburg", "country": "Sweden"},
                        "entry": {"hostname": "de-fra-wg-001", "city": "Frankfurt", "country": "Germany"},
                        "multihop": true, "daita": true, "quantum_resistant": true, "obfuscation": null,
                        "features": ["Multihop", "Daita", "QuantumResistance"]},
        })
    }

    fn strip_ansi(s: &str) -> String {
        let mut out = String::new();
        let mut it = s.chars().peekable();
        while let Some(c) = it.next() {
            if c == '\x1b' {
                for d in it.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    #[test]
    fn golden_structure() {
        let text = render(&fixture(), false);
        println!("{text}");
        assert!(!text.contains('\x1b'), "no colours off a terminal");
        let lines: Vec<&str> = text.lines().collect();
        for l in &lines {
            assert!(
                l.chars().count() <= WIDTH,
                "{} columns: {l:?}",
                l.chars().count()
            );
        }
        assert_eq!(
            lines[0],
            "wirescope status  2026-09-21 14:13:20 UTC  agent healthy"
        );
        assert_eq!(
            lines[1],
            "Mullvad connected  de-fra-wg-001 (Frankfurt) -> se-got-wg-101 (Gothenburg)"
        );
        assert_eq!(lines[2], "Multihop, Daita, QuantumResistance");
        let head = lines
            .iter()
            .position(|l| l.starts_with("wg0-mullvad  netlink  port 51820  2 peers"))
            .expect("tunnel header");
        assert_eq!(
            lines[head + 1],
            "  MTU 1420  path MTU 1400  recommended 1340"
        );
        assert_eq!(
            columns(lines[head + 2]),
            [
                "hop",
                "via",
                "peer",
                "name",
                "handshake",
                "hs RTT",
                "probe RTT/loss"
            ]
        );
        assert_eq!(
            columns(lines[head + 3]),
            [
                "1",
                "eth0",
                "FXUjJ9fc…",
                "de-fra-wg-001",
                "12 s",
                "580 us",
                "-"
            ]
        );
        let exit = lines
            .iter()
            .position(|l| l.starts_with("  2 "))
            .expect("exit row");
        assert_eq!(
            columns(lines[exit]),
            [
                "2",
                "FXUjJ9fc…",
                "aAg5tydA…",
                "a-very-long-f…",
                "312 s",
                "-",
                "42.10 ms 10.0%"
            ]
        );
        // Details under the rows, indented.
        for want in [
            "      endpoint 198.51.100.7:51820",
            "tx 200 pkt 36.7 KiB overhead 64.0 B/pkt 12.5 KiB 34.0%",
            "rx 200 pkt 36.7 KiB overhead 64.0 B/pkt 12.5 KiB 34.0%",
            "gaps 0 late 0 loss 0.00%",
            "transit tx 115 us rx -",
            "path MTU 1400",
            "path healthy",
            "relay entry de-fra-wg-001 (Frankfurt)",
            "tx 123456789 pkt 92.0 GiB overhead 56.7 B/pkt 6.5 GiB 7.1%",
            "gaps 30 late 2 loss 2.72%",
            "hs timeouts 3",
            "path UNHEALTHY",
            "probe 10.64.0.1 sent 20 lost 2 last 39.00 ms",
            "  drops wg0-mullvad: NO_SOCKET 9, NETFILTER_DROP 7",
            "  leaks eth0: dns 3",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // Problems, one line each where they fit.
        for want in [
            "  ! aAg5tydA… handshake 312 s old: peer unreachable or keys wrong",
            "  ! path MTU 1400 < tunnel MTU 1420 + 60: set MTU 1340",
            "  ! aAg5tydA… 3 handshake initiations unanswered: check the endpoint and",
            "  ! aAg5tydA… 2.7% of messages lost on the way (30 gaps, 2 late): lossy path",
            "  ! aAg5tydA… path unhealthy:",
            "  ! 3 packets left eth0 outside the tunnel (dns 3):",
            "  ! 4 WireGuard packet fragments out on eth0: lower the tunnel MTU to 1340",
            "  ! 3 UDP receive errors on port 51820:",
        ] {
            assert!(
                lines.iter().any(|l| l.starts_with(want)),
                "missing {want:?} in\n{text}"
            );
        }
        assert!(
            !text.contains("! FXUjJ9fc"),
            "the entry relay is fine:\n{text}"
        );
        // Drops on interfaces no table covers.
        assert!(text.contains("other interfaces\n  drops lo: SOCKET_RCVBUFF 199"));
    }

    #[test]
    fn colours_only_when_asked_and_still_80_columns() {
        let text = render(&fixture(), true);
        assert!(text.contains("\x1b[31m  ! "), "problems in red");
        assert!(text.contains("\x1b[1m"), "headers bold");
        for l in strip_ansi(&text).lines() {
            assert!(l.chars().count() <= WIDTH, "{l:?}");
        }
        assert_eq!(strip_ansi(&text), render(&fixture(), false));
    }

    /// Decodes `v` as `wirescope status` does and renders it.
    fn render_json(v: &Value) -> Result<String, String> {
        let body = serde_json::to_vec(v).unwrap();
        crate::ops::status::decode(&body).map(|s| render(&s.doc, false))
    }

    #[test]
    fn odd_snapshots_render_without_panicking() {
        for v in [
            json!({"tunnels": []}),
            json!({"tunnels": [{"peers": [{}]}]}),
            json!({"tunnels": [{"interface": "x".repeat(200), "peers": [{"public_key": "y".repeat(300), "via": "z".repeat(90)}]}], "healthy": false, "health_reason": "w ".repeat(100)}),
            json!({"tunnels": [], "mullvad": {"up": true}, "path": {}}),
        ] {
            let text = render_json(&v).unwrap();
            for l in text.lines() {
                assert!(l.chars().count() <= WIDTH, "{l:?}");
            }
        }
        // Not a snapshot at all: refused with the reason, nothing rendered.
        for (v, why) in [
            (json!({}), "no \"tunnels\" list"),
            (
                json!({"tunnels": "nope", "mullvad": {"up": false, "error": "mullvad: not found"}}),
                "no \"tunnels\" list",
            ),
            (
                json!({"tunnels": [{"peers": [{"hop": "two"}]}]}),
                "invalid type: string \"two\", expected u32",
            ),
        ] {
            let e = render_json(&v).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let t =
            render_json(&json!({"tunnels": [], "mullvad": {"up": false, "error": "timed out"}}))
                .unwrap();
        assert!(
            t.contains("  ! Mullvad daemon unreadable: timed out"),
            "{t}"
        );
    }
}
