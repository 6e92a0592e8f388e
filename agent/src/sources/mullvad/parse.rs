//! `mullvad status --json` read tolerantly into [`MullvadStatus`]: only `state` is
//! required; every other field is optional, and one of an unexpected type is left out and
//! noted rather than failing the whole status. Lines before the JSON (the CLI's warnings
//! about the device's account) give the device state.

use super::*;

#[derive(Deserialize)]
struct RawStatus {
    state: Value,
    #[serde(default)]
    details: Value,
}

#[derive(Deserialize, Default)]
struct RawDetails {
    endpoint: Option<Value>,
    location: Option<Value>,
    feature_indicators: Option<Value>,
    locked_down: Option<Value>,
    cause: Option<Value>,
    block_failure: Option<Value>,
}

#[derive(Deserialize)]
struct RawEndpoint {
    address: Option<String>,
    protocol: Option<String>,
    quantum_resistant: Option<bool>,
    obfuscation: Option<Value>,
    entry_endpoint: Option<Value>,
    tunnel_interface: Option<String>,
    daita: Option<Value>,
}

#[derive(Deserialize)]
struct RawLocation {
    hostname: Option<String>,
    city: Option<String>,
    country: Option<String>,
    entry_hostname: Option<String>,
    entry_city: Option<String>,
    entry_country: Option<String>,
    ipv4: Option<String>,
    ipv6: Option<String>,
    mullvad_exit_ip: Option<bool>,
}

/// Parses `mullvad status --json` output. Only a missing or non-string `state` (or output that
/// is not JSON) is an error; everything else that cannot be read is noted in `unreadable`.
pub fn parse_status(text: &str) -> Result<MullvadStatus, ParseError> {
    if text.trim().is_empty() {
        return Err(ParseError::Empty);
    }
    let (warnings, json) = split_warnings(text)?;
    // Without the trailing newline, output cut inside a string reads as ended (EOF), not as
    // a string with a control character in it.
    let raw: RawStatus = serde_json::from_str(json.trim_end()).map_err(|e| match e.classify() {
        serde_json::error::Category::Eof => ParseError::Truncated {
            // Lines of the whole output, the warnings included.
            line: e.line() + text[..text.len() - json.len()].matches('\n').count(),
            column: e.column(),
        },
        // A JSON value of the wrong shape (e.g. no `state`, or an array).
        serde_json::error::Category::Data => ParseError::NoState(e.to_string()),
        _ => ParseError::NotJson(e.to_string()),
    })?;
    // serde also reads a struct from a JSON array (`["connected"]` would be state
    // "connected"); the status is an object, so valid JSON starting with `[` is an array.
    if json.trim_start().starts_with('[') {
        return Err(ParseError::NoState(format!(
            "an array: {}",
            short(json.trim())
        )));
    }
    let state = match &raw.state {
        Value::String(s) if !s.is_empty() => TunnelState::from_name(s),
        other => return Err(ParseError::NoState(short(&other.to_string()))),
    };
    let mut status = MullvadStatus {
        device: device_state(&state, &warnings),
        state,
        endpoint: None,
        location: None,
        feature_indicators: Vec::new(),
        warnings: Vec::new(),
        locked_down: None,
        after_disconnect: None,
        error_cause: None,
        blocking: None,
        unreadable: Vec::new(),
    };
    for w in &warnings {
        if !w.starts_with("Warning:") {
            status
                .unreadable
                .push(format!("text before the JSON: {}", short(w)));
        }
    }
    status.warnings = warnings;
    let notes = &mut status.unreadable;
    // Disconnecting's details are a bare string (what follows); the others an object.
    if status.state == TunnelState::Disconnecting {
        match &raw.details {
            Value::String(s) => status.after_disconnect = Some(s.clone()),
            Value::Null => {}
            other => notes.push(format!(
                "details: not a string: {}",
                short(&other.to_string())
            )),
        }
        return Ok(status);
    }
    if let TunnelState::Other(_) = status.state {
        // Nothing is known about an unknown state's details: not read, not an error.
        return Ok(status);
    }
    let details: RawDetails = match raw.details {
        Value::Null => RawDetails::default(),
        v @ Value::Object(_) => read(v, "details", notes).unwrap_or_default(),
        other => {
            notes.push(format!(
                "details: not an object: {}",
                short(&other.to_string())
            ));
            RawDetails::default()
        }
    };
    if let Some(v) = details.location.filter(|v| !v.is_null()) {
        status.location = read::<RawLocation>(v, "details.location", notes).map(|l| Location {
            hostname: l.hostname,
            city: l.city,
            country: l.country,
            entry_hostname: l.entry_hostname,
            entry_city: l.entry_city,
            entry_country: l.entry_country,
            ipv4: l.ipv4,
            ipv6: l.ipv6,
            mullvad_exit_ip: l.mullvad_exit_ip,
        });
    }
    if let Some(v) = details.feature_indicators.filter(|v| !v.is_null()) {
        status.feature_indicators =
            read::<Vec<String>>(v, "details.feature_indicators", notes).unwrap_or_default();
    }
    match status.state {
        TunnelState::Connected | TunnelState::Connecting => {
            if let Some(v) = details.endpoint.filter(|v| !v.is_null()) {
                status.endpoint =
                    read::<RawEndpoint>(v, "details.endpoint", notes).map(|e| endpoint(e, notes));
            }
        }
        TunnelState::Disconnected => {
            status.locked_down = match details.locked_down {
                Some(Value::Bool(b)) => Some(b),
                None | Some(Value::Null) => None,
                Some(other) => {
                    notes.push(format!("details.locked_down: not a boolean: {other}"));
                    None
                }
            };
        }
        TunnelState::Error => {
            status.error_cause = details.cause.as_ref().and_then(|c| match c {
                Value::String(s) => Some(s.clone()),
                Value::Object(m) => m.get("reason").and_then(Value::as_str).map(str::to_owned),
                _ => None,
            });
            if details.cause.as_ref().is_some_and(|c| !c.is_null()) && status.error_cause.is_none()
            {
                notes.push("details.cause: no `reason`".into());
            }
            status.blocking = Some(details.block_failure.is_none_or(|b| b.is_null()));
        }
        TunnelState::Disconnecting | TunnelState::Other(_) => {}
    }
    Ok(status)
}

/// The lines before the JSON document, trimmed, and the document: it starts at the first line
/// that starts with `{` or `[` (the CLI prints it on one line, after its warnings). Output
/// with no such line is all document (and fails as JSON if it is not), unless it starts
/// with the CLI's `Warning:`, which has nothing after it then.
fn split_warnings(text: &str) -> Result<(Vec<String>, &str), ParseError> {
    let mut warnings = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('{') || t.starts_with('[') {
            return Ok((warnings, &text[offset..]));
        }
        if !t.is_empty() {
            warnings.push(t.to_owned());
        }
        offset += line.len();
    }
    match warnings.first() {
        Some(first) if first.starts_with("Warning:") => Err(ParseError::NoJsonAfter(short(first))),
        _ => Ok((Vec::new(), text)),
    }
}

/// The device state the warning lines tell, in a tunnel state where the CLI checks it
/// (connecting, connected, error: it warns in no other).
fn device_state(state: &TunnelState, warnings: &[String]) -> DeviceState {
    let says = |what: &str| {
        warnings
            .iter()
            .any(|w| w.to_ascii_lowercase().contains(what))
    };
    if says("revoked") {
        DeviceState::Revoked
    } else if says("not logged in") {
        DeviceState::LoggedOut
    } else if !warnings.is_empty() {
        DeviceState::Unknown
    } else if matches!(
        state,
        TunnelState::Connected | TunnelState::Connecting | TunnelState::Error
    ) {
        DeviceState::LoggedIn
    } else {
        DeviceState::Unknown
    }
}

/// Reads `v` as a `T`, or notes at `path` why it could not.
fn read<T: for<'de> Deserialize<'de>>(v: Value, path: &str, notes: &mut Vec<String>) -> Option<T> {
    match serde_json::from_value(v) {
        Ok(t) => Some(t),
        Err(e) => {
            notes.push(format!("{path}: {e}"));
            None
        }
    }
}

fn endpoint(e: RawEndpoint, notes: &mut Vec<String>) -> Endpoint {
    let address = e
        .address
        .as_deref()
        .and_then(|a| socket_addr(a, "details.endpoint.address", notes));
    let entry_address = match e.entry_endpoint {
        None | Some(Value::Null) => None,
        // `{"address": "IP:PORT", "protocol": "udp"}`, or a bare "IP:PORT".
        Some(Value::Object(m)) => match m.get("address") {
            Some(Value::String(a)) => {
                socket_addr(a, "details.endpoint.entry_endpoint.address", notes)
            }
            _ => {
                notes.push("details.endpoint.entry_endpoint: no string `address`".into());
                None
            }
        },
        Some(Value::String(a)) => socket_addr(&a, "details.endpoint.entry_endpoint", notes),
        Some(other) => {
            notes.push(format!(
                "details.endpoint.entry_endpoint: neither an object nor a string: {}",
                short(&other.to_string())
            ));
            None
        }
    };
    let (obfuscation, obfuscators) = match e.obfuscation {
        None | Some(Value::Null) => (None, Vec::new()),
        Some(v) => obfuscation(v, notes),
    };
    // A boolean in every released version; an object (DAITA's settings, as some third-party
    // docs show it) counts as on unless it says `"enabled": false`.
    let daita = match e.daita {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(Value::Object(m)) => m.get("enabled").and_then(Value::as_bool).unwrap_or(true),
        Some(other) => {
            notes.push(format!(
                "details.endpoint.daita: {}",
                short(&other.to_string())
            ));
            false
        }
    };
    Endpoint {
        address,
        protocol: e.protocol,
        entry_address,
        quantum_resistant: e.quantum_resistant.unwrap_or(false),
        obfuscation,
        obfuscators,
        daita,
        tunnel_interface: e.tunnel_interface,
    }
}

/// `details.endpoint.obfuscation`, not null: the kind in lower case and its obfuscators.
/// Since 2025.13 an externally tagged enum, `{"Single": OBFUSCATOR}` or
/// `{"Multiplexer": {"direct": ENDPOINT|null, "obfuscators": [OBFUSCATOR, ...]}}`; before,
/// a bare OBFUSCATOR (`{"endpoint": {"address", "protocol"}, "obfuscation_type": "udp2tcp"}`).
/// A bare type name is read too. What cannot be read is noted and counts as `unknown`.
fn obfuscation(v: Value, notes: &mut Vec<String>) -> (Option<String>, Vec<Obfuscator>) {
    const PATH: &str = "details.endpoint.obfuscation";
    let unknown = |notes: &mut Vec<String>, why: String| {
        notes.push(format!("{PATH}: {why}"));
        (Some("unknown".to_owned()), Vec::new())
    };
    match v {
        Value::String(s) => (Some(s.to_ascii_lowercase()), Vec::new()),
        Value::Object(m) => {
            if let Some(single) = m.get("Single") {
                return match obfuscator(single, &format!("{PATH}.Single"), notes) {
                    Some(o) => (Some(o.kind.clone()), vec![o]),
                    None => (Some("unknown".to_owned()), Vec::new()),
                };
            }
            if let Some(mux) = m.get("Multiplexer") {
                let list = match mux.get("obfuscators") {
                    Some(Value::Array(a)) => a
                        .iter()
                        .enumerate()
                        .filter_map(|(i, o)| {
                            obfuscator(o, &format!("{PATH}.Multiplexer.obfuscators[{i}]"), notes)
                        })
                        .collect(),
                    None | Some(Value::Null) => Vec::new(),
                    Some(other) => {
                        notes.push(format!(
                            "{PATH}.Multiplexer.obfuscators: not a list: {}",
                            short(&other.to_string())
                        ));
                        Vec::new()
                    }
                };
                return (Some("multiplexer".to_owned()), list);
            }
            if m.contains_key("obfuscation_type") {
                let o = obfuscator(&Value::Object(m), PATH, notes);
                return match o {
                    Some(o) => (Some(o.kind.clone()), vec![o]),
                    None => (Some("unknown".to_owned()), Vec::new()),
                };
            }
            unknown(
                notes,
                format!("an unknown shape: {}", short(&Value::Object(m).to_string())),
            )
        }
        other => unknown(notes, short(&other.to_string())),
    }
}

/// One `{"endpoint": {"address": "IP:PORT", "protocol": "udp"}, "obfuscation_type": "Quic"}`;
/// None (noted) without a string type.
fn obfuscator(v: &Value, path: &str, notes: &mut Vec<String>) -> Option<Obfuscator> {
    let Some(kind) = v.get("obfuscation_type").and_then(Value::as_str) else {
        notes.push(format!("{path}: no string `obfuscation_type`"));
        return None;
    };
    let ep = v.get("endpoint");
    Some(Obfuscator {
        kind: kind.to_ascii_lowercase(),
        address: ep
            .and_then(|e| e.get("address"))
            .and_then(Value::as_str)
            .and_then(|a| socket_addr(a, &format!("{path}.endpoint.address"), notes)),
        protocol: ep
            .and_then(|e| e.get("protocol"))
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// "IP:PORT" (IPv6 in brackets); a bare IP gets port 0.
fn socket_addr(s: &str, path: &str, notes: &mut Vec<String>) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 0));
    }
    notes.push(format!("{path}: {s:?} is not IP:PORT"));
    None
}

/// At most 80 characters of `s`, for messages.
pub(super) fn short(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}
