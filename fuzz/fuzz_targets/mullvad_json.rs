//! The Mullvad JSON reader, `wirescope::sources::mullvad::parse_status` (`mullvad status --json`),
//! and what the agent does with its result (the state the poller keeps, the probe target,
//! the relay roles, the messages). Nothing may panic; an accepted status is JSON (after the
//! lines the CLI may print before it, such as `Warning: This device has been revoked.`) whose
//! `state` string is the state read; parsing is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wirescope::sources::mullvad::{MullvadError, MullvadState, ParseError, TunnelState, parse_status};

fuzz_target!(|data: &[u8]| {
    // The poller reads the output lossily.
    let text = String::from_utf8_lossy(data);
    let res = parse_status(&text);
    assert_eq!(res, parse_status(&text));
    let mut state = MullvadState::default();
    match res {
        Ok(status) => {
            // The JSON starts at the first line that starts with `{` or `[`, or is all of it.
            let mut json: &str = &text;
            let mut at = 0;
            for line in text.split_inclusive('\n') {
                let t = line.trim();
                if t.starts_with('{') || t.starts_with('[') {
                    json = &text[at..];
                    break;
                }
                at += line.len();
            }
            let v: serde_json::Value = match serde_json::from_str(json.trim_end()) {
                Ok(v) => v,
                // Valid JSON with a number no f64 holds (1e400) in a field the reader
                // ignores: accepted rightly, but a Value cannot represent it.
                Err(e) if e.to_string().contains("number out of range") => return,
                Err(e) => panic!("accepted output is not JSON: {e}"),
            };
            let name = v["state"]
                .as_str()
                .expect("accepted output has a string state");
            assert_eq!(status.state, TunnelState::from_name(name));
            assert_eq!(status.state.name(), name);
            let _ = (
                status.multihop(),
                status.daita(),
                status.quantum_resistant(),
            );
            let connected = status.state == TunnelState::Connected;
            let relays = status.has_relays() && status.endpoint.is_some();
            state.record(Ok(status));
            assert_eq!(state.probe_target().is_some(), connected);
            let roles = state.relay_roles();
            assert!(roles.len() <= 2);
            if !relays {
                assert!(roles.is_empty());
            }
        }
        Err(error) => {
            assert_eq!(matches!(error, ParseError::Empty), text.trim().is_empty());
            let e = MullvadError::Parse {
                cli: "mullvad".into(),
                hint: error.hint(),
                error,
                start: text.chars().take(80).collect(),
            };
            state.record(Err(&e));
            assert!(state.current().is_none() && state.relay_roles().is_empty());
            assert!(state.last_error.is_some());
        }
    }
});
