//! `wirescope status`: asks a running agent for `/api/v1/status` and prints one table per
//! tunnel interface, 80 columns wide at most: a row per peer (hop, via, key, name, handshake
//! age, handshake RTT, probe RTT and loss), the peer's details on indented lines below it
//! (traffic and overhead per direction, counter gaps and late messages, transit time, path
//! MTU, ...), then the interface's drops and leaks and one line per problem found, each
//! saying what it means or what to do. `--json` prints the snapshot itself, `--watch`
//! redraws every second.
//!
//! [`fetch`] decodes the answer into [`StatusDoc`], tolerantly (an older agent's missing
//! fields take their defaults); [`render`] (render.rs) draws it with the text primitives of
//! format.rs.

mod format;
mod render;

use std::{
    io::{IsTerminal, Write},
    time::Duration,
};

use serde::{Deserialize, de::IgnoredAny};
use serde_json::Value;

use self::{
    format::{RED, paint, truncate, wrap},
    render::header_line,
};
pub use self::{
    format::{WIDTH, abbrev, fmt_age, fmt_bytes, fmt_secs, fmt_utc},
    render::{columns, render},
};
use crate::{
    config::cli::StatusArgs,
    ops::client::{AgentClient, ClientError},
    serve::status::doc::StatusDoc,
};

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

/// A snapshot as the agent sent it: decoded, and as JSON for `--json` (which prints what
/// the agent said, fields this version does not know included).
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub doc: StatusDoc,
    pub json: Value,
}

/// What an agent answers instead of a snapshot when it cannot build one.
#[derive(Deserialize)]
struct Refusal {
    error: String,
}

/// Whether there is a `tunnels` list at all: without one, not a status snapshot.
#[derive(Deserialize)]
struct Listed {
    #[serde(rename = "tunnels")]
    _tunnels: Vec<IgnoredAny>,
}

/// `body` as a snapshot, or why it is not one (the cause of [`FetchError::BadAnswer`]).
pub fn decode(body: &[u8]) -> Result<Snapshot, String> {
    let json: Value = serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))?;
    if let Ok(Refusal { error }) = Refusal::deserialize(&json) {
        return Err(format!("the agent says: {error}"));
    }
    if Listed::deserialize(&json).is_err() {
        return Err("no \"tunnels\" list".into());
    }
    // From the text, so that the error has a line and column, and the text there.
    let doc = serde_json::from_slice(body).map_err(|e| {
        let text = String::from_utf8_lossy(body);
        let line = text.lines().nth(e.line().saturating_sub(1)).unwrap_or("");
        let end = e.column().min(line.chars().count());
        let start = end.saturating_sub(40);
        let near: String = line.chars().skip(start).take(end - start).collect();
        format!("a field of the wrong type: {e}, at `{}`", near.trim())
    })?;
    Ok(Snapshot { doc, json })
}

/// The agent's `/api/v1/status` snapshot, checked to be one.
pub fn fetch(client: &AgentClient) -> Result<Snapshot, FetchError> {
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
    decode(&body).map_err(|cause| FetchError::BadAnswer { addr, cause })
}

/// The text `wirescope status` prints for a snapshot.
fn output(s: &Snapshot, json: bool, color: bool) -> String {
    if json {
        serde_json::to_string_pretty(&s.json).unwrap_or_default() + "\n"
    } else {
        render(&s.doc, color)
    }
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
            Ok(s) => {
                let text = output(&s, args.json, color);
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
            Ok(s) => output(&s, args.json, color),
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

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use crate::config::cli::AgentAddr;

    use super::*;

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
    fn fetch_at(addr: &str) -> Result<Snapshot, FetchError> {
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
        assert!(fetch_at(&addr).unwrap().doc.tunnels.is_empty());

        let addr = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"a\": 1}\n");
        let e = fetch_at(&addr).unwrap_err().to_string();
        assert!(e.contains("no \"tunnels\" list"), "{e}");

        let addr = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"tunnels\": []}");
        assert!(fetch_at(&addr).unwrap().doc.tunnels.is_empty());

        // A field of the wrong type: named, with where it is.
        let addr = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{\"tunnels\": [{\"peers\": [{\"hop\": \"2\"}]}]}",
        );
        let e = fetch_at(&addr).unwrap_err().to_string();
        assert!(
            e.contains("a field of the wrong type: invalid type: string \"2\", expected u32")
                && e.contains(r#"at `{"tunnels": [{"peers": [{"hop": "2"`"#),
            "{e}"
        );
    }
}
