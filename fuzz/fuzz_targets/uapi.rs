//! The WireGuard control-socket (UAPI) parser, `wirescope::sources::wg::parse_uapi`, over arbitrary
//! `get=1` answers. Nothing may panic; an answer is accepted only with `errno=0`; a parse is
//! deterministic; and no error message quotes a private or preshared key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wirescope::sources::wg::{WgError, format_allowed_ips, key_to_base64, parse_uapi};

fuzz_target!(|data: &[u8]| {
    // read_uapi_at refuses non-UTF-8 answers before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let res = parse_uapi("wg0", text);
    match &res {
        Ok(dev) => {
            assert_eq!(dev.name, "wg0");
            assert!(
                text.lines().any(
                    |l| l.strip_prefix("errno=").and_then(|v| v.parse::<i64>().ok()) == Some(0)
                ),
                "accepted without errno=0"
            );
            assert_ne!(
                dev.public_key,
                Some([0; 32]),
                "all-zero private key means none"
            );
            if let Some(pk) = &dev.public_key {
                assert_eq!(key_to_base64(pk).len(), 44);
            }
            for p in &dev.peers {
                assert_eq!(key_to_base64(&p.public_key).len(), 44);
                assert_ne!(p.persistent_keepalive, Some(0));
                let _ = format_allowed_ips(&p.allowed_ips);
                if let Some(t) = p.last_handshake {
                    assert!(t > std::time::UNIX_EPOCH, "{t:?}");
                }
            }
        }
        Err(e) => {
            assert!(
                matches!(e, WgError::Malformed { .. } | WgError::Errno { .. }),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains("wg0"), "{msg}");
            // Secrets: every key value (64 hex digits) on a private_key or preshared_key line,
            // unless the same digits are also in another line, as is or as the message
            // quotes it (escaped).
            let is_secret_line =
                |l: &str| l.starts_with("private_key=") || l.starts_with("preshared_key=");
            let secrets = text.lines().filter(|l| is_secret_line(l)).filter_map(|l| {
                let v = l.split_once('=').map_or("", |(_, v)| v);
                (v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())).then_some(v)
            });
            for s in secrets {
                let elsewhere = text
                    .lines()
                    .any(|l| !is_secret_line(l) && (l.contains(s) || format!("{l:?}").contains(s)));
                if !elsewhere {
                    assert!(!msg.contains(s), "secret {s:?} in {msg:?}");
                }
            }
        }
    }
    // Deterministic: the same answer parses the same way.
    match (res, parse_uapi("wg0", text)) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("{a:?} then {b:?}"),
    }
});
