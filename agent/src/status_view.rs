//! `wirescope status`: asks a running agent for `/api/v1/status` and prints one table per
//! tunnel interface, 80 columns wide at most: a row per peer (hop, via, key, name, handshake
//! age, handshake RTT, probe RTT and loss), the peer's details on indented lines below it
//! (traffic and overhead per direction, counter gaps and late messages, transit time, path
//! MTU, ...), then the interface's drops and leaks and one line per problem found, each
//! saying what it means or what to do. `--json` prints the snapshot itself, `--watch`
//! redraws every second.

use std::{
    fmt::Write as _,
    io::{IsTerminal, Write},
    time::Duration,
};

use serde_json::Value;

use crate::{
    client::{AgentClient, ClientError},
    config::cli::StatusArgs,
};

/// The width every line fits in.
pub const WIDTH: usize = 80;
/// Handshakes older than this mean the session is gone (WireGuard rejects after 180 s).
const STALE_HANDSHAKE_S: f64 = 180.0;
/// Counter-gap loss at or above this is reported.
const LOSS_WARN_PERCENT: f64 = 1.0;
/// Where the status lives on the agent.
const PATH: &str = "/api/v1/status";
/// Larger answers are refused (a status is a few KiB per peer).
const MAX_BODY: u64 = 64 << 20;

/// Why the snapshot could not be had; the message names the address and what to try.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A bad address, CA file or missing password, or no answer at all.
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the agent at {addr} answered {PATH} with HTTP {code}{body}: {hint}")]
    Http {
        addr: String,
        code: u16,
        body: String,
        hint: &'static str,
    },
    #[error(
        "the answer from {addr}{PATH} is not a wirescope status snapshot ({cause}): is {addr} a wirescope agent? try --web.listen-address ADDR"
    )]
    BadAnswer { addr: String, cause: String },
}

/// The agent's `/api/v1/status` snapshot, checked to be one.
pub fn fetch(client: &AgentClient) -> Result<Value, FetchError> {
    let addr = client.base().to_string();
    let (code, body) = client.get(PATH, "application/json", MAX_BODY)?;
    if code != 200 {
        let text = String::from_utf8_lossy(&body);
        let text = text.trim();
        return Err(FetchError::Http {
            addr,
            code,
            body: if text.is_empty() {
                String::new()
            } else {
                format!(" ({})", truncate(text, 80))
            },
            hint: client.status_hint(code),
        });
    }
    let bad = |cause: String| FetchError::BadAnswer {
        addr: addr.clone(),
        cause,
    };
    let v: Value = serde_json::from_slice(&body).map_err(|e| bad(format!("bad JSON: {e}")))?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(bad(format!("the agent says: {e}")));
    }
    if !v.get("tunnels").is_some_and(Value::is_array) {
        return Err(bad("no \"tunnels\" list".into()));
    }
    Ok(v)
}

/// `wirescope status`: the exit status (0 shown, 1 the agent could not be read, 2 a bad
/// address).
pub fn run(args: &StatusArgs) -> u8 {
    let color = std::io::stdout().is_terminal();
    let mut out = std::io::stdout();
    // A bad address, CA file or missing password is a usage error: exit 2, as clap's.
    let client = match AgentClient::new(&args.agent) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wirescope: {e}");
            return 2;
        }
    };
    if !args.watch {
        return match fetch(&client) {
            Ok(v) => {
                let text = if args.json {
                    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
                } else {
                    render(&v, color)
                };
                // A closed pipe (`| head`) is not an error worth a message.
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
                0
            }
            Err(e) => {
                eprintln!("wirescope: {e}");
                1
            }
        };
    }
    // --watch: redraw in place every second until interrupted (SIGINT ends the process);
    // a failed read is shown in place of the tables and retried.
    loop {
        let text = match fetch(&client) {
            Ok(v) if args.json => serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
            Ok(v) => render(&v, color),
            Err(e) => {
                let mut s = format!("{}\n", header_line(now_unix(), None, color));
                for l in wrap(&format!("wirescope: {e}"), 0, 2) {
                    s.push_str(&paint(&l, RED, color));
                    s.push('\n');
                }
                s
            }
        };
        if out
            .write_all(format!("\x1b[2J\x1b[H{text}").as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return 0;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------

const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const CYAN: &str = "\x1b[36m";

fn paint(s: &str, code: &str, color: bool) -> String {
    if color {
        format!("{code}{s}\x1b[0m")
    } else {
        s.to_string()
    }
}

/// `s` cut to `n` characters, the last one `…` when cut.
fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// A public key (or anything long) as its first 8 characters and `…`.
pub fn abbrev(key: &str) -> String {
    if key.chars().count() <= 9 {
        key.to_string()
    } else {
        let mut s: String = key.chars().take(8).collect();
        s.push('…');
        s
    }
}

/// `s` left-aligned in `w` columns (cut with `…` when longer).
fn cell(s: &str, w: usize) -> String {
    let t = truncate(s, w);
    let pad = w.saturating_sub(t.chars().count());
    format!("{t}{}", " ".repeat(pad))
}

/// A duration in seconds with a unit that keeps 2-3 significant digits.
pub fn fmt_secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        "?".into()
    } else if s < 1e-3 {
        format!("{:.0} us", s * 1e6)
    } else if s < 0.1 {
        format!("{:.2} ms", s * 1e3)
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// An age in whole seconds below 10 minutes, then minutes, hours, days.
pub fn fmt_age(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "?".into();
    }
    let s = s.round() as u64;
    match s {
        0..600 => format!("{s} s"),
        600..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// UNIX seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn fmt_utc(t: u64) -> String {
    let days = (t / 86_400) as i64;
    let rem = t % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `text` wrapped at word boundaries into lines of at most [`WIDTH`] columns: the first
/// indented by `first`, the rest by `rest`. A word longer than a line is cut.
fn wrap(text: &str, first: usize, rest: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = " ".repeat(first);
    let mut len = first;
    let mut empty = true;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let wl = word.chars().count();
        if !empty && len + 1 + wl > WIDTH {
            out.push(std::mem::take(&mut line));
            line = " ".repeat(rest);
            len = rest;
            empty = true;
        }
        let room = WIDTH.saturating_sub(if empty { len } else { len + 1 });
        let w = truncate(word, room.max(1));
        if !empty {
            line.push(' ');
            len += 1;
        }
        len += w.chars().count();
        line.push_str(&w);
        empty = false;
    }
    if !empty || out.is_empty() {
        out.push(line);
    }
    out
}

/// Items (each kept whole when it fits) packed onto lines indented by `indent`, separated
/// by two spaces, none wider than [`WIDTH`].
fn pack(items: &[String], indent: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = String::new();
    for item in items {
        let il = item.chars().count();
        let cur = line.chars().count();
        if cur > 0 && cur + 2 + il > WIDTH {
            out.push(std::mem::take(&mut line));
        }
        if line.is_empty() {
            if indent + il > WIDTH {
                // Too long for one line on its own: wrapped by words.
                out.extend(wrap(item, indent, indent + 2));
                continue;
            }
            line = format!("{}{item}", " ".repeat(indent));
        } else {
            line.push_str("  ");
            line.push_str(item);
        }
    }
    if !line.is_empty() {
        out.push(line);
    }
    out
}

fn f64_at(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64()
}

fn u64_at(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_u64()
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn arr(v: &Value, key: &str) -> Vec<Value> {
    v.get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn header_line(time: u64, healthy: Option<(bool, Option<&str>)>, color: bool) -> String {
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
fn peer_block(p: &Value, underlays: &[String]) -> (String, Vec<String>, Vec<String>) {
    let key = str_at(p, "public_key").unwrap_or("?");
    let short = abbrev(key);
    let hop = u64_at(p, &["hop"]).map_or("?".into(), |h| h.to_string());
    let via = str_at(p, "via").unwrap_or("");
    let via = if via.is_empty() {
        "-".to_string()
    } else if underlays.iter().any(|u| u == via) || via.chars().count() <= 10 {
        via.to_string()
    } else {
        abbrev(via)
    };
    let relay = p.get("mullvad_relay").filter(|r| r.is_object());
    let name = str_at(p, "friendly_name")
        .map(str::to_string)
        .or_else(|| {
            relay
                .and_then(|r| str_at(r, "hostname"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "-".into());
    let age = f64_at(p, &["latest_handshake_age_seconds"]);
    let hs = age.map_or("never".into(), fmt_age);
    let hs_rtt = f64_at(p, &["handshake_rtt", "mean_seconds"]).map_or("-".into(), fmt_secs);
    let probes = arr(p, "probes");
    let probe = {
        let (mut sent, mut lost, mut sum, mut replies) = (0u64, 0u64, 0.0f64, 0u64);
        for pr in &probes {
            sent += u64_at(pr, &["sent"]).unwrap_or(0);
            lost += u64_at(pr, &["lost"]).unwrap_or(0);
            let r = u64_at(pr, &["replies"]).unwrap_or(0);
            if let Some(m) = f64_at(pr, &["rtt_mean_seconds"]) {
                sum += m * r as f64;
                replies += r;
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
    if let Some(e) = str_at(p, "endpoint") {
        items.push(format!("endpoint {e}"));
    }
    for dir in ["tx", "rx"] {
        let t = &p["traffic"][dir];
        let pk = u64_at(t, &["tunnel", "packets"]).unwrap_or(0);
        let by = u64_at(t, &["tunnel", "bytes"]).unwrap_or(0);
        let mut s = format!("{dir} {pk} pkt {}", fmt_bytes(by));
        if let (Some(bpp), Some(ob), Some(pct)) = (
            f64_at(t, &["overhead", "bytes_per_packet"]),
            u64_at(t, &["overhead", "bytes"]),
            f64_at(t, &["overhead", "percent"]),
        ) {
            let _ = write!(s, " overhead {bpp:.1} B/pkt {} {pct:.1}%", fmt_bytes(ob));
        }
        items.push(s);
    }
    let gaps = u64_at(p, &["transit_loss", "gaps"]).unwrap_or(0);
    let late = u64_at(p, &["transit_loss", "late"]).unwrap_or(0);
    let loss = f64_at(p, &["transit_loss", "loss_percent"]);
    items.push(format!(
        "gaps {gaps} late {late} loss {}",
        loss.map_or("-".into(), |l| format!("{l:.2}%"))
    ));
    let tt = |d: &str| f64_at(p, &["transit_time", d, "mean_seconds"]).map(fmt_secs);
    if let (tx, rx) = (tt("tx"), tt("rx"))
        && (tx.is_some() || rx.is_some())
    {
        items.push(format!(
            "transit tx {} rx {}",
            tx.unwrap_or("-".into()),
            rx.unwrap_or("-".into())
        ));
    }
    let timeouts = u64_at(p, &["handshake_timeouts"]).unwrap_or(0);
    if timeouts > 0 {
        items.push(format!("hs timeouts {timeouts}"));
    }
    if let Some(m) = u64_at(p, &["path_mtu_bytes"]) {
        items.push(format!("path MTU {m}"));
    }
    match p.get("path_healthy").and_then(Value::as_bool) {
        Some(true) => items.push("path healthy".into()),
        Some(false) => items.push("path UNHEALTHY".into()),
        None => {}
    }
    if let Some(r) = relay {
        let mut s = format!(
            "relay {} {}",
            str_at(r, "role").unwrap_or("?"),
            str_at(r, "hostname").unwrap_or("?")
        );
        if let Some(c) = str_at(r, "city").filter(|c| !c.is_empty()) {
            let _ = write!(s, " ({c})");
        }
        items.push(s);
    }
    for pr in &probes {
        let target = str_at(pr, "target").unwrap_or("?");
        let mut s = format!(
            "probe {target} sent {} lost {}",
            u64_at(pr, &["sent"]).unwrap_or(0),
            u64_at(pr, &["lost"]).unwrap_or(0)
        );
        if let Some(l) = f64_at(pr, &["recent", "rtt_last_seconds"]) {
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
    for pr in &probes {
        if let Some(l) = f64_at(pr, &["recent", "loss_percent"]).filter(|l| *l > 0.0) {
            problems.push(format!(
                "{short} probe loss {l:.1}% to {} in the last minute: lossy path or target down",
                str_at(pr, "target").unwrap_or("?")
            ));
        }
    }
    if p.get("path_healthy").and_then(Value::as_bool) == Some(false) {
        problems.push(format!(
            "{short} path unhealthy: RTT, loss or handshake age beyond the failover thresholds"
        ));
    }
    (line, pack(&items, 6), problems)
}

/// Drops of `iface` as `iface REASON n, REASON n`.
fn drops_of(v: &Value, iface: &str) -> Option<String> {
    let d = arr(v, "drops")
        .into_iter()
        .find(|d| str_at(d, "interface") == Some(iface))?;
    let reasons: Vec<String> = arr(&d, "top_reasons")
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                str_at(r, "reason").unwrap_or("?"),
                u64_at(r, &["packets"]).unwrap_or(0)
            )
        })
        .collect();
    let name = if iface.is_empty() {
        "(no device)"
    } else {
        iface
    };
    Some(format!("{name}: {}", reasons.join(", ")))
}

/// Leaks on `iface` as (total packets, `dns 3 ipv4 2`).
fn leaks_of(v: &Value, iface: &str) -> (u64, String) {
    let mut total = 0;
    let mut parts = Vec::new();
    for l in arr(v, "leaks") {
        if str_at(&l, "interface") != Some(iface) {
            continue;
        }
        let n = u64_at(&l, &["packets"]).unwrap_or(0);
        if n > 0 {
            total += n;
            parts.push(format!("{} {n}", str_at(&l, "kind").unwrap_or("?")));
        }
    }
    (total, parts.join(" "))
}

/// The whole status as text, every line at most [`WIDTH`] columns (colour codes aside).
pub fn render(v: &Value, color: bool) -> String {
    let mut out: Vec<String> = Vec::new();
    let problem = |out: &mut Vec<String>, text: &str| {
        for l in wrap(&format!("! {text}"), 2, 4) {
            out.push(paint(&l, RED, color));
        }
    };
    let healthy = v.get("healthy").and_then(Value::as_bool).unwrap_or(false);
    out.push(header_line(
        u64_at(v, &["time"]).unwrap_or(0),
        Some((healthy, str_at(v, "health_reason"))),
        color,
    ));
    if !healthy {
        problem(
            &mut out,
            &format!(
                "agent unhealthy: {}",
                str_at(v, "health_reason").unwrap_or("no reason given")
            ),
        );
    }
    if let Some(m) = v.get("mullvad").filter(|m| m.is_object()) {
        if m.get("up").and_then(Value::as_bool) == Some(true) {
            let state = str_at(m, "state").unwrap_or("?");
            let relay = |r: &Value| -> Option<String> {
                let h = str_at(r, "hostname")?;
                Some(match str_at(r, "city").filter(|c| !c.is_empty()) {
                    Some(c) => format!("{h} ({c})"),
                    None => h.to_string(),
                })
            };
            let mut items = vec![format!("Mullvad {state}")];
            match (relay(&m["entry"]), relay(&m["exit"])) {
                (Some(e), Some(x)) => items.push(format!("{e} -> {x}")),
                (None, Some(x)) => items.push(x),
                _ => {}
            }
            let feats: Vec<&str> = m
                .get("features")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if !feats.is_empty() {
                items.push(feats.join(", "));
            }
            for l in pack(&items, 0) {
                out.push(paint(&l, CYAN, color));
            }
            if state == "error" {
                problem(
                    &mut out,
                    &format!(
                        "Mullvad is in the error state: {}",
                        str_at(m, "error").unwrap_or("no cause given")
                    ),
                );
            } else if state != "connected" {
                problem(
                    &mut out,
                    &format!("Mullvad is {state}: no traffic goes through its tunnel"),
                );
            }
        } else {
            problem(
                &mut out,
                &format!(
                    "Mullvad daemon unreadable: {}",
                    str_at(m, "error").unwrap_or("no reason given")
                ),
            );
        }
    }
    let underlays: Vec<String> = arr(v, "underlays")
        .iter()
        .filter_map(|u| str_at(u, "interface").map(str::to_string))
        .collect();
    let mut shown: Vec<String> = Vec::new();
    let tunnels = arr(v, "tunnels");
    if tunnels.is_empty() {
        out.push(String::new());
        out.push("no WireGuard interface is watched".into());
    }
    for t in &tunnels {
        let name = str_at(t, "interface").unwrap_or("?");
        let mtu = u64_at(t, &["mtu"]);
        let mut peers = arr(t, "peers");
        // A stable order from one redraw to the next: by hop, then key.
        peers.sort_by_key(|p| {
            (
                u64_at(p, &["hop"]).unwrap_or(u64::MAX),
                str_at(p, "public_key").unwrap_or("").to_string(),
            )
        });
        out.push(String::new());
        let head = format!(
            "{name}  {}  port {}  {} peer{}",
            str_at(t, "backend").unwrap_or("?"),
            u64_at(t, &["listen_port"]).unwrap_or(0),
            peers.len(),
            if peers.len() == 1 { "" } else { "s" }
        );
        for l in pack(&[head], 0) {
            out.push(paint(&l, BOLD, color));
        }
        let path_mtu = u64_at(t, &["path_mtu_bytes"]);
        let rec = u64_at(t, &["recommended_mtu"]);
        let mut mtus = vec![format!(
            "MTU {}",
            mtu.map_or("?".to_string(), |m| m.to_string())
        )];
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
            if let Some(via) = str_at(p, "via").filter(|u| underlays.iter().any(|x| x == u))
                && !vias.iter().any(|x| x == via)
            {
                vias.push(via.to_string());
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
        if let (Some(m), Some(r)) = (mtu, rec)
            && r < m
        {
            problems.push(match path_mtu {
                Some(p) => format!(
                    "path MTU {p} < tunnel MTU {m} + {}: set MTU {r}",
                    p.saturating_sub(r)
                ),
                None => format!("tunnel MTU {m} above the path's: set MTU {r}"),
            });
        }
        let path = v.get("path").cloned().unwrap_or(Value::Null);
        for f in arr(&path, "fragments") {
            let i = str_at(&f, "interface").unwrap_or("");
            let n = u64_at(&f, &["packets"]).unwrap_or(0);
            if n > 0 && str_at(&f, "layer") == Some("outer") && ifaces.iter().any(|x| x == i) {
                problems.push(format!(
                    "{n} WireGuard packet fragments {} on {i}: lower the tunnel MTU{}",
                    if str_at(&f, "direction") == Some("rx") {
                        "in"
                    } else {
                        "out"
                    },
                    rec.map_or(String::new(), |r| format!(" to {r}"))
                ));
            }
        }
        for r in arr(&path, "icmp_reported_mtu") {
            let i = str_at(&r, "interface").unwrap_or("");
            if let Some(b) = u64_at(&r, &["bytes"])
                && ifaces.iter().any(|x| x == i)
            {
                problems.push(format!(
                    "ICMP too-big on {i} reports a path MTU of {b}: packets above it are dropped"
                ));
            }
        }
        for u in arr(v, "udp_receive_errors") {
            if str_at(&u, "interface") == Some(name) {
                let n = u64_at(&u, &["errors"]).unwrap_or(0);
                if n > 0 {
                    problems.push(format!(
                        "{n} UDP receive errors on port {}: socket buffer full, raise net.core.rmem_max",
                        u64_at(&u, &["port"]).unwrap_or(0)
                    ));
                }
            }
        }
        for pr in problems {
            problem(&mut out, &pr);
        }
    }
    // Whatever no table showed: drops elsewhere, leaks on other underlays.
    let mut rest = Vec::new();
    for d in arr(v, "drops") {
        let i = str_at(&d, "interface").unwrap_or("");
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
    use serde_json::json;
    use std::io::Read as _;

    use crate::config::cli::AgentAddr;

    use super::*;

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
    /// above the path's, leaks on the underlay, drops, Mullvad connected.
    fn fixture() -> Value {
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

    #[test]
    fn odd_snapshots_render_without_panicking() {
        for v in [
            json!({}),
            json!({"tunnels": []}),
            json!({"tunnels": [{"peers": [{}]}]}),
            json!({"tunnels": [{"interface": "x".repeat(200), "peers": [{"public_key": "y".repeat(300), "via": "z".repeat(90)}]}], "healthy": false, "health_reason": "w ".repeat(100)}),
            json!({"tunnels": "nope", "mullvad": {"up": false, "error": "mullvad: not found"}}),
        ] {
            for l in render(&v, false).lines() {
                assert!(l.chars().count() <= WIDTH, "{l:?}");
            }
        }
        let t = render(
            &json!({"tunnels": [], "mullvad": {"up": false, "error": "timed out"}}),
            false,
        );
        assert!(
            t.contains("  ! Mullvad daemon unreadable: timed out"),
            "{t}"
        );
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(fmt_age(12.4), "12 s");
        assert_eq!(fmt_age(599.0), "599 s");
        assert_eq!(fmt_age(3600.0), "60 min");
        assert_eq!(fmt_age(86_400.0 * 3.0), "3 d");
        assert_eq!(fmt_secs(0.000115), "115 us");
        assert_eq!(fmt_secs(0.00058), "580 us");
        assert_eq!(fmt_secs(0.0042), "4.20 ms");
        assert_eq!(fmt_secs(0.25), "250 ms");
        assert_eq!(fmt_secs(2.5), "2.50 s");
        assert_eq!(fmt_bytes(1023), "1023 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(abbrev(ENTRY), "FXUjJ9fc…");
        assert_eq!(abbrev("eth0"), "eth0");
        let w = wrap(&"word ".repeat(40), 2, 4);
        assert!(w.len() > 1 && w.iter().all(|l| l.chars().count() <= WIDTH));
        assert!(w[1].starts_with("    word"));
    }

    /// Serves `answer` to one connection on a loopback port; returns the address.
    fn serve_once(answer: &'static [u8]) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(answer);
            }
        });
        addr
    }

    /// `fetch` from the agent at `addr` (plain HTTP).
    fn fetch_at(addr: &str) -> Result<Value, FetchError> {
        fetch(&AgentClient::new(&AgentAddr::plain(addr))?)
    }

    #[test]
    fn errors_name_the_address_and_the_fix() {
        let e = fetch_at("nonsense").unwrap_err().to_string();
        assert!(
            e.starts_with("--web.listen-address \"nonsense\" is not an address"),
            "{e}"
        );

        // A port nothing listens on: bind, learn the port, close.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let e = fetch_at(&addr).unwrap_err().to_string();
        assert!(
            e.contains(&format!("cannot reach the agent at http://{addr}")),
            "{e}"
        );
        assert!(
            e.contains("is `wirescope run` running there? try --web.listen-address"),
            "{e}"
        );

        let addr = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nnot json");
        let e = fetch_at(&addr).unwrap_err().to_string();
        assert!(e.contains(&addr) && e.contains("bad JSON"), "{e}");
        assert!(e.contains("try --web.listen-address"), "{e}");

        let addr = serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n");
        let e = fetch_at(&addr).unwrap_err().to_string();
        assert!(e.contains("HTTP 404 (not found)"), "{e}");

        // Basic auth wanted: the message names the flag and the variable.
        let addr = serve_once(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"wirescope\"\r\nContent-Length: 0\r\n\r\n",
        );
        let e = fetch_at(&addr).unwrap_err().to_string();
        assert!(
            e.contains("HTTP 401")
                && e.contains("--web.user")
                && e.contains("WIRESCOPE_WEB_PASSWORD"),
            "{e}"
        );

        // A chunked answer is read whole.
        let addr = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"t\r\nc\r\nunnels\": []}\r\n0\r\n\r\n",
        );
        assert_eq!(fetch_at(&addr).unwrap()["tunnels"], json!([]));

        let addr = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"a\": 1}\n");
        let e = fetch_at(&addr).unwrap_err().to_string();
        assert!(e.contains("no \"tunnels\" list"), "{e}");

        let addr = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"tunnels\": []}");
        assert_eq!(fetch_at(&addr).unwrap()["tunnels"], json!([]));
    }
}
