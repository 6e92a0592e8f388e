use std::{sync::Mutex, time::Instant};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::oneshot,
};

use super::*;
use crate::config::web;

/// Writes a fake source's fixed body.
fn write_body(out: &mut dyn std::fmt::Write, body: &str) -> Result<(), String> {
    out.write_str(body).map_err(|e| e.to_string())
}

/// A source whose answers the test controls.
#[derive(Default)]
struct Fake {
    unhealthy: Mutex<Option<String>>,
    metrics_error: Mutex<Option<String>>,
    /// A body to answer in both formats instead of the small one.
    body: Mutex<Option<String>>,
}

impl HttpSource for Fake {
    fn metrics(&self, format: Format, out: &mut dyn std::fmt::Write) -> Result<(), String> {
        if let Some(e) = self.metrics_error.lock().unwrap().clone() {
            return Err(e);
        }
        if let Some(body) = self.body.lock().unwrap().as_deref() {
            return write_body(out, body);
        }
        write_body(
            out,
            match format {
                Format::OpenMetrics => "# TYPE x counter\nx_total 1\n# EOF\n",
                Format::Prometheus => "# TYPE x_total counter\nx_total 1\n",
            },
        )
    }

    fn health(&self) -> Result<(), String> {
        match self.unhealthy.lock().unwrap().clone() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({ "tunnels": [{ "name": "wg0", "peers": 2 }] })
    }
}

pub(super) struct Running {
    pub(super) addr: SocketAddr,
    fake: Arc<Fake>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), HttpError>>,
}

impl Running {
    pub(super) async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }
}

pub(super) async fn start_with(cfg: impl FnOnce(&mut HttpConfig)) -> Running {
    let mut c = HttpConfig::new("127.0.0.1:0".parse().unwrap(), "/metrics");
    cfg(&mut c);
    let server = bind(c).await.expect("bind");
    let addr = server.local_addr();
    let fake = Arc::new(Fake::default());
    let (tx, rx) = oneshot::channel::<()>();
    let source: Arc<dyn HttpSource> = fake.clone();
    let task = tokio::spawn(server.serve(source, async {
        let _ = rx.await;
    }));
    Running {
        addr,
        fake,
        stop: Some(tx),
        task,
    }
}

async fn start() -> Running {
    start_with(|_| {}).await
}

pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: String,
    /// The body's bytes as sent (`body` is their lossy UTF-8).
    raw_body: Vec<u8>,
}

impl Reply {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection, `Connection: close`, read to the end.
pub(super) async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> Reply {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !extra.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str("Host: localhost\r\n");
    }
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .expect("response within 5 s")
        .unwrap();
    parse(&raw)
}

pub(super) fn parse(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let raw_body = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or_else(Vec::new, |i| raw[i + 4..].to_vec());
    Reply {
        status,
        headers,
        body: body.to_owned(),
        raw_body,
    }
}

/// The metrics body is gzip-compressed exactly when the client accepts gzip, and says so;
/// decompressed it is the plain body byte for byte.
#[tokio::test]
async fn metrics_gzip_when_accepted() {
    let srv = start().await;
    let plain = request(srv.addr, "GET", "/metrics", &[]).await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.header("vary"), Some("Accept, Accept-Encoding"));
    for accept in ["gzip", "deflate, gzip;q=0.5", "x-gzip", "*", "br, *;q=0.1"] {
        let r = request(srv.addr, "GET", "/metrics", &[("Accept-Encoding", accept)]).await;
        assert_eq!(r.status, 200, "{accept}");
        assert_eq!(r.header("content-encoding"), Some("gzip"), "{accept}");
        let mut out = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(r.raw_body.as_slice()),
            &mut out,
        )
        .expect("a gzip body");
        assert_eq!(out, plain.body, "{accept}");
    }
    for accept in [
        "identity",
        "gzip;q=0",
        "deflate",
        "*;q=0",
        "br, gzip; q=0.0",
    ] {
        let r = request(srv.addr, "GET", "/metrics", &[("Accept-Encoding", accept)]).await;
        assert_eq!(r.header("content-encoding"), None, "{accept}");
        assert_eq!(r.body, plain.body, "{accept}");
    }
    // Only the metrics: the other paths are small.
    let r = request(srv.addr, "GET", "/healthz", &[("Accept-Encoding", "gzip")]).await;
    assert_eq!(r.header("content-encoding"), None);
    srv.stop().await;
}

/// An uncompressed body of many packed blocks ([`packed`]) reaches the client byte for
/// byte, with its exact Content-Length (not chunked), as does its gzip form; HEAD gets the
/// length without the body.
#[tokio::test]
async fn a_long_plain_body_is_sent_whole() {
    let srv = start().await;
    let mut body = String::new();
    for i in 0..60_000u64 {
        body.push_str(&format!(
            "wirescope_x_total{{peer=\"p{i}\",direction=\"rx\",name=\"ü{}\"}} {}\n",
            i % 13,
            i * 7
        ));
    }
    assert!(body.len() > 100 * packed::BLOCK, "{} bytes", body.len());
    *srv.fake.body.lock().unwrap() = Some(body.clone());
    let r = request(srv.addr, "GET", "/metrics", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(
        r.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(r.raw_body.len(), body.len());
    assert!(r.raw_body == body.as_bytes(), "the body differs");
    let gz = request(srv.addr, "GET", "/metrics", &[("Accept-Encoding", "gzip")]).await;
    let mut out = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(gz.raw_body.as_slice()),
        &mut out,
    )
    .expect("a gzip body");
    assert!(out == body, "the gzip body differs");
    let head = request(srv.addr, "HEAD", "/metrics", &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert!(head.raw_body.is_empty());
    srv.stop().await;
}

/// A body many times the compressor's buffer, written in pieces as the encoders write it
/// (a label at a time, pieces straddling the buffer's end), comes out byte for byte.
#[test]
fn gzip_text_streams_a_long_body() {
    use std::fmt::Write as _;
    let mut z = GzipText::new();
    let mut plain = String::new();
    for i in 0..40_000 {
        let line = format!(
            "wirescope_x_total{{peer=\"p{i}\",direction=\"rx\"}} {}\n",
            i * 7
        );
        for piece in line.split_inclusive(['{', ',', '}']) {
            z.write_str(piece).unwrap();
        }
        plain.push_str(&line);
    }
    assert!(plain.len() > 20 * GzipText::BUF, "{} bytes", plain.len());
    let gz = z.finish().expect("compressed");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut out)
        .expect("a gzip body");
    assert_eq!(out.len(), plain.len());
    assert!(out == plain, "the decompressed body differs");
}

#[tokio::test]
async fn every_path() {
    let srv = start().await;

    let r = request(srv.addr, "GET", "/metrics", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(r.body, "# TYPE x_total counter\nx_total 1\n");
    assert_eq!(r.header("vary"), Some("Accept, Accept-Encoding"));

    let prometheus_accept =
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    let r = request(
        srv.addr,
        "GET",
        "/metrics",
        &[("Accept", prometheus_accept)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(r.body.ends_with("# EOF\n"));

    // Query strings do not change the route.
    let r = request(srv.addr, "GET", "/metrics?x=1", &[("Accept", "text/plain")]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "# TYPE x_total counter\nx_total 1\n")
    );

    let r = request(srv.addr, "GET", "/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    for link in [
        "href=\"/metrics\"",
        "href=\"/healthz\"",
        "href=\"/api/v1/status\"",
    ] {
        assert!(r.body.contains(link), "{link} missing from {}", r.body);
    }

    let r = request(srv.addr, "GET", "/healthz", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    *srv.fake.unhealthy.lock().unwrap() = Some("programs detached from wg0".into());
    let r = request(srv.addr, "GET", "/healthz", &[]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "programs detached from wg0\n")
    );

    let r = request(srv.addr, "GET", "/api/v1/status", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(v["tunnels"][0]["name"], "wg0");

    let r = request(srv.addr, "GET", "/nope", &[]).await;
    assert_eq!(r.status, 404);
    let r = request(srv.addr, "POST", "/metrics", &[("Content-Length", "0")]).await;
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    let r = request(srv.addr, "HEAD", "/metrics", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, ""));

    *srv.fake.metrics_error.lock().unwrap() = Some("inventory lock poisoned".into());
    let r = request(srv.addr, "GET", "/metrics", &[]).await;
    assert_eq!(r.status, 500);
    assert!(r.body.contains("inventory lock poisoned"), "{}", r.body);

    srv.stop().await;
}

#[tokio::test]
async fn custom_telemetry_path_and_keep_alive() {
    let srv = start_with(|c| c.telemetry_path = "/a<b>".into()).await;
    assert_eq!(request(srv.addr, "GET", "/metrics", &[]).await.status, 404);
    assert_eq!(request(srv.addr, "GET", "/a%3Cb%3E", &[]).await.status, 404);
    // The landing page escapes the path it links.
    let r = request(srv.addr, "GET", "/", &[]).await;
    assert!(r.body.contains("href=\"/a&lt;b&gt;\""), "{}", r.body);
    srv.stop().await;

    // Two requests on one kept-alive connection, as Prometheus does.
    let srv = start().await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let r = parse(&buf[..n]);
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    }
    drop(s);
    srv.stop().await;
}

#[tokio::test]
async fn bind_conflict_names_the_address() {
    let srv = start().await;
    let err = bind(HttpConfig::new(srv.addr, "/metrics"))
        .await
        .err()
        .expect("second bind must fail");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("cannot listen on {}", srv.addr)),
        "{msg}"
    );
    assert!(msg.contains("--web.listen-address"), "{msg}");
    // An address no interface has.
    let err = bind(HttpConfig::new(
        "192.0.2.1:9586".parse().unwrap(),
        "/metrics",
    ))
    .await
    .err()
    .unwrap();
    assert!(
        err.to_string()
            .starts_with("cannot listen on 192.0.2.1:9586: "),
        "{err}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn ipv6_any_accepts_ipv4_too() {
    let server = match bind(HttpConfig::new("[::]:0".parse().unwrap(), "/metrics")).await {
        Ok(s) => s,
        // A host without IPv6 falls back to 0.0.0.0; either way the v4 request below works.
        Err(e) => panic!("bind [::]:0: {e}"),
    };
    let port = server.local_addr().port();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(Arc::new(Fake::default()), async {
        let _ = rx.await;
    }));
    let r = request(
        SocketAddr::from(([127, 0, 0, 1], port)),
        "GET",
        "/healthz",
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn idle_and_slow_clients_are_cut_off() {
    let srv = start_with(|c| c.header_read_timeout = Duration::from_millis(300)).await;
    // Connects and says nothing.
    let mut idle = TcpStream::connect(srv.addr).await.unwrap();
    // Starts a request and never finishes its headers.
    let mut slow = TcpStream::connect(srv.addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    for s in [&mut idle, &mut slow] {
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("server must close the connection")
            .ok();
    }
    assert!(start.elapsed() < Duration::from_secs(3));
    srv.stop().await;
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let srv = start().await;
    let big = "x".repeat(32 * 1024);
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let req = format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {big}\r\n\r\n");
    // The server may close before reading it all; a write error is fine.
    let _ = s.write_all(req.as_bytes()).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .expect("closed");
    let r = parse(&raw);
    assert!(r.status == 431 || raw.is_empty(), "status {}", r.status);
    // And the server still serves others.
    assert_eq!(request(srv.addr, "GET", "/healthz", &[]).await.status, 200);
    srv.stop().await;
}

/// Past `max_connections` a connection is answered 503 at once and closed, not left in the
/// listen backlog; once a slot frees (here: the hog's header timeout), requests are served.
#[tokio::test]
async fn connections_past_the_limit_are_refused_at_once() {
    let srv = start_with(|c| {
        c.max_connections = 1;
        c.header_read_timeout = Duration::from_millis(500);
    })
    .await;
    // Holds the only slot until the header timeout frees it.
    let hog = TcpStream::connect(srv.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let r = request(srv.addr, "GET", "/healthz", &[]).await;
    let waited = start.elapsed();
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body, "too many open connections to this agent: retry\n");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        waited < Duration::from_millis(300),
        "refused after {waited:?}: it waited for a slot"
    );
    // The hog's slot frees at its header timeout (500 ms after it connected).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(request(srv.addr, "GET", "/healthz", &[]).await.status, 200);
    drop(hog);
    srv.stop().await;
}

/// A /healthz probe is answered at once beside stalled clients that hold all but one slot:
/// half sent a whole request and never read the answer, half sent half a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_answered_beside_stalled_clients() {
    const STALLED: usize = 40;
    let srv = start_with(|c| c.max_connections = STALLED + 1).await;
    let mut stalled = Vec::new();
    for i in 0..STALLED {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let req: &[u8] = if i % 2 == 0 {
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"
        } else {
            b"GET /metrics HTTP/1.1\r\nHo"
        };
        s.write_all(req).await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        let start = Instant::now();
        let r = request(srv.addr, "GET", "/healthz", &[]).await;
        assert_eq!(r.status, 200);
        let took = start.elapsed();
        assert!(took < Duration::from_millis(100), "answered after {took:?}");
    }
    // The one slot left is taken: the next connection is refused, not queued.
    let hog = TcpStream::connect(srv.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(request(srv.addr, "GET", "/healthz", &[]).await.status, 503);
    drop((hog, stalled));
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish() {
    struct Slow;
    impl HttpSource for Slow {
        fn metrics(&self, _: Format, out: &mut dyn std::fmt::Write) -> Result<(), String> {
            std::thread::sleep(Duration::from_millis(300));
            write_body(out, "slow 1\n")
        }
        fn health(&self) -> Result<(), String> {
            Ok(())
        }
        fn status(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }
    let server = bind(HttpConfig::new("127.0.0.1:0".parse().unwrap(), "/metrics"))
        .await
        .unwrap();
    let addr = server.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(Arc::new(Slow), async {
        let _ = rx.await;
    }));
    let req = tokio::spawn(async move { request(addr, "GET", "/metrics", &[]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = tx.send(());
    let r = req.await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "slow 1\n"));
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // And nothing listens any more.
    assert!(TcpStream::connect(addr).await.is_err());
}

// ---------------------------------------------------------------------------------------
// --web.config.file: TLS and basic auth
// ---------------------------------------------------------------------------------------

/// A self-signed test certificate (CN=localhost, IP 127.0.0.1, P-256, valid until 2125) and
/// its key: a fixture, used nowhere else.
pub(super) const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBrTCCAVSgAwIBAgIUXjfmB+LPHLoXS+OI3o0xRJY8ak0wCgYIKoZIzj0EAwIw\nFDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyNjA0MjYwNVoYDzIxMjYxMTAy\nMDQyNjA1WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO\nPQMBBwNCAARcO8QMlhxdCgSPJ5xLEtJfmpiOmxHXoF82/0EmkieN9MziDzvoDH1m\nurUfpqDRQsyvvGrk3Ssqht9b6FV/Sr4Ho4GBMH8wHQYDVR0OBBYEFC34HjPPqeRw\nF9qoY1L0vHzN0CrTMB8GA1UdIwQYMBaAFC34HjPPqeRwF9qoY1L0vHzN0CrTMBoG\nA1UdEQQTMBGCCWxvY2FsaG9zdIcEfwAAATAMBgNVHRMBAf8EAjAAMBMGA1UdJQQM\nMAoGCCsGAQUFBwMBMAoGCCqGSM49BAMCA0cAMEQCIB0PxNBeCl6t86yedpj3LYjZ\nZFeC74qYjLplwMl+7EtYAiA7OiB9AuGwrUU7k5b9hvIn+v5RiHk9kE8wwGIDdW+2\nHw==\n-----END CERTIFICATE-----\n";
pub(super) const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgYM0OZPXSDd60ZvvO\nf4ZtQx9iENI+DT8itwaplmj3UvmhRANCAARcO8QMlhxdCgSPJ5xLEtJfmpiOmxHX\noF82/0EmkieN9MziDzvoDH1murUfpqDRQsyvvGrk3Ssqht9b6FV/Sr4H\n-----END PRIVATE KEY-----\n";

/// The fixture written to a fresh directory; the web config's TLS part pointing at it.
fn tls_fixture(name: &str, min: Option<&str>, max: Option<&str>) -> crate::config::TlsConfig {
    let dir = std::env::temp_dir().join(format!("wirescope-http-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), TEST_CERT).unwrap();
    std::fs::write(dir.join("key.pem"), TEST_KEY).unwrap();
    crate::config::TlsConfig {
        cert: crate::config::Pem::File(dir.join("cert.pem")),
        key: crate::config::Pem::File(dir.join("key.pem")),
        client_auth_type: "NoClientCert".into(),
        client_ca: None,
        min_version: min.map(str::to_owned),
        max_version: max.map(str::to_owned),
        cipher_suites: Vec::new(),
        curve_preferences: Vec::new(),
        prefer_server_cipher_suites: true,
    }
}

fn users() -> std::collections::BTreeMap<String, String> {
    std::collections::BTreeMap::from([(
        "prometheus".to_string(),
        bcrypt::hash("s3cret", 4).unwrap(),
    )])
}

pub(super) fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// What a TLS request got: the negotiated suite and group, and the response.
pub(super) struct TlsReply {
    pub suite: rustls::CipherSuite,
    pub group: Option<rustls::NamedGroup>,
    pub reply: Reply,
}

/// GET `path` over TLS (`Connection: close`) trusting only `root` (PEM), offering
/// `versions` and rustls' default suites in its order, with `extra` headers; Err when the
/// handshake fails.
pub(super) async fn tls_get(
    addr: SocketAddr,
    root: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    path: &str,
    extra: &[(&str, &str)],
) -> Result<TlsReply, String> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(root.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let conn = s.get_ref().1;
    let suite = conn.negotiated_cipher_suite().map(|c| c.suite());
    let group = conn.negotiated_key_exchange_group().map(|g| g.name());
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .expect("response within 5 s")
        .map_err(|e| e.to_string())?;
    Ok(TlsReply {
        suite: suite.ok_or("no suite")?,
        group,
        reply: parse(&raw),
    })
}

/// One request over TLS `version`, trusting the fixture; Err when the handshake fails.
async fn tls_request(
    addr: SocketAddr,
    version: &'static rustls::SupportedProtocolVersion,
    path: &str,
    extra: &[(&str, &str)],
) -> Result<Reply, String> {
    Ok(tls_get(addr, TEST_CERT, &[version], path, extra)
        .await?
        .reply)
}

/// Every path, known or not, needs the credentials: none or wrong ones get 401 with a
/// Basic challenge and nothing of the content; the right ones get the content.
#[tokio::test]
async fn basic_auth_on_every_path() {
    let users = users();
    let srv = start_with(move |c| {
        c.web.auth = Some(Arc::new(web::BasicAuth::new(users).unwrap()));
    })
    .await;
    for path in ["/metrics", "/", "/healthz", "/api/v1/status", "/nope"] {
        for creds in [
            None,
            Some(basic("prometheus", "wrong")),
            Some(basic("nobody", "s3cret")),
            Some(basic("prometheus", "")),
            Some("Bearer s3cret".to_string()),
        ] {
            let extra: Vec<(&str, &str)> = creds
                .as_deref()
                .map(|c| ("Authorization", c))
                .into_iter()
                .collect();
            let r = request(srv.addr, "GET", path, &extra).await;
            assert_eq!(r.status, 401, "{path} with {creds:?}");
            assert_eq!(
                r.header("www-authenticate"),
                Some("Basic realm=\"wirescope\", charset=\"UTF-8\""),
                "{path}"
            );
            assert!(
                !r.body.contains("x_total") && !r.body.contains("wg0"),
                "{path}: {}",
                r.body
            );
        }
    }
    let ok = basic("prometheus", "s3cret");
    let r = request(srv.addr, "GET", "/metrics", &[("Authorization", &ok)]).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("x_total 1"), "{}", r.body);
    let r = request(srv.addr, "GET", "/api/v1/status", &[("Authorization", &ok)]).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("wg0"));
    let r = request(srv.addr, "GET", "/nope", &[("Authorization", &ok)]).await;
    assert_eq!(r.status, 404);
    srv.stop().await;
}

/// HTTPS: TLS 1.3 and 1.2 clients trusting the certificate get the metrics; a plain-HTTP
/// request gets 400 and nothing else; min_version is enforced; auth works inside TLS.
#[tokio::test]
async fn tls_serves_and_refuses_plain_http() {
    let tls = tls_fixture("tls", None, None);
    let users = users();
    let srv = start_with(move |c| {
        c.web.tls = Some(Arc::new(web::server_config(&tls).unwrap()));
        c.web.auth = Some(Arc::new(web::BasicAuth::new(users).unwrap()));
    })
    .await;
    let ok = basic("prometheus", "s3cret");
    for v in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let r = tls_request(srv.addr, v, "/metrics", &[("Authorization", &ok)])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{v:?}");
        assert!(r.body.contains("x_total 1"), "{}", r.body);
        let r = tls_request(srv.addr, v, "/metrics", &[]).await.unwrap();
        assert_eq!(r.status, 401);
    }
    let r = request(srv.addr, "GET", "/metrics", &[("Authorization", &ok)]).await;
    assert_eq!(r.status, 400);
    assert!(
        r.body.contains("HTTP request to an HTTPS server"),
        "{}",
        r.body
    );
    assert!(!r.body.contains("x_total"));
    srv.stop().await;

    // min_version TLS13: a TLS 1.2-only client is refused.
    let tls = tls_fixture("tls13", Some("TLS13"), None);
    let srv = start_with(move |c| {
        c.web.tls = Some(Arc::new(web::server_config(&tls).unwrap()));
    })
    .await;
    assert!(
        tls_request(srv.addr, &rustls::version::TLS12, "/", &[])
            .await
            .is_err()
    );
    let r = tls_request(srv.addr, &rustls::version::TLS13, "/", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    srv.stop().await;
}

/// A client that connects to the TLS listener and never starts the handshake is cut off
/// after header_read_timeout, like a silent plain-HTTP client.
#[tokio::test]
async fn silent_tls_clients_are_cut_off() {
    let tls = tls_fixture("silent", None, None);
    let srv = start_with(move |c| {
        c.web.tls = Some(Arc::new(web::server_config(&tls).unwrap()));
        c.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed within 5 s");
    assert!(n.is_ok_and(|n| n == 0) || buf.is_empty());
    assert!(started.elapsed() < Duration::from_secs(3));
    srv.stop().await;
}

/// 50 scrapes that arrive while a slow body is rendered share the next one: the source is
/// asked twice, not 51 times, and every scrape gets a whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scrapes_render_once() {
    struct Counting(std::sync::atomic::AtomicUsize);
    impl HttpSource for Counting {
        fn metrics(&self, _: Format, out: &mut dyn std::fmt::Write) -> Result<(), String> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            std::thread::sleep(Duration::from_millis(300));
            write_body(out, &format!("# TYPE r gauge\nr {n}\n"))
        }
        fn health(&self) -> Result<(), String> {
            Ok(())
        }
        fn status(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }
    let server = bind(HttpConfig::new("127.0.0.1:0".parse().unwrap(), "/metrics"))
        .await
        .unwrap();
    let addr = server.local_addr();
    let source = Arc::new(Counting(Default::default()));
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(source.clone(), async {
        let _ = rx.await;
    }));
    let first = tokio::spawn(async move { request(addr, "GET", "/metrics", &[]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let burst: Vec<_> = (0..50)
        .map(|_| tokio::spawn(async move { request(addr, "GET", "/metrics", &[]).await }))
        .collect();
    assert_eq!(first.await.unwrap().body, "# TYPE r gauge\nr 1\n");
    for b in burst {
        let r = b.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "# TYPE r gauge\nr 2\n");
    }
    assert_eq!(source.0.load(std::sync::atomic::Ordering::SeqCst), 2);
    // A scrape after the burst is rendered anew.
    let r = request(addr, "GET", "/metrics", &[]).await;
    assert_eq!(r.body, "# TYPE r gauge\nr 3\n");
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

/// A client that asks for a large body and never reads it loses its connection once the
/// server's writes have made no progress for `write_timeout`: with one connection allowed,
/// the next client is refused until then and served soon after, not after the connection's
/// maximum age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_do_not_read_are_cut_off() {
    struct Big;
    impl HttpSource for Big {
        fn metrics(&self, _: Format, out: &mut dyn std::fmt::Write) -> Result<(), String> {
            // Far more than the socket buffers on loopback hold.
            write_body(out, &"x".repeat(64 << 20))
        }
        fn health(&self) -> Result<(), String> {
            Ok(())
        }
        fn status(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }
    let mut cfg = HttpConfig::new("127.0.0.1:0".parse().unwrap(), "/metrics");
    cfg.max_connections = 1;
    cfg.write_timeout = Duration::from_millis(500);
    cfg.max_connection_age = Duration::from_secs(120);
    let server = bind(cfg).await.unwrap();
    let addr = server.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(Arc::new(Big), async {
        let _ = rx.await;
    }));
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    // The stalled client holds the only slot: refused until its write timeout cuts it off.
    assert_eq!(request(addr, "GET", "/healthz", &[]).await.status, 503);
    let served = loop {
        let r = request(addr, "GET", "/healthz", &[]).await;
        if r.status == 200 {
            break start.elapsed();
        }
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still refused after 10 s: the stalled client was not cut off"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        served >= Duration::from_millis(200),
        "served after {served:?}: the stalled client did not hold the only slot"
    );
    drop(stalled);
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

/// On a loopback listener only localhost, loopback addresses and --web.allowed-host names
/// are answered (DNS rebinding); the refusal says how to allow a name. Elsewhere any Host.
#[tokio::test]
async fn loopback_listener_answers_only_its_own_names() {
    let srv = start_with(|c| c.allowed_hosts = vec!["metrics.example.net".into()]).await;
    let port = srv.addr.port();
    for host in [
        format!("127.0.0.1:{port}"),
        "localhost".into(),
        format!("LocalHost.:{port}"),
        "grafana.localhost".into(),
        "127.0.0.2".into(),
        format!("[::1]:{port}"),
        "metrics.example.net".into(),
        format!("Metrics.Example.Net:{port}"),
    ] {
        let r = request(srv.addr, "GET", "/api/v1/status", &[("Host", &host)]).await;
        assert_eq!(r.status, 200, "{host}");
    }
    for host in [
        "evil.example",
        "evil.example:9586",
        "localhost.evil.example",
        "192.0.2.1",
        "[2001:db8::1]:9586",
        "127.0.0.1:x",
        "[::1",
        "",
    ] {
        let r = request(srv.addr, "GET", "/api/v1/status", &[("Host", host)]).await;
        assert_eq!(r.status, 421, "{host:?}");
        assert!(r.body.contains("--web.allowed-host"), "{}", r.body);
    }
    srv.stop().await;

    // Any address: a remote Prometheus names it however it reaches it.
    let any = start_with(|c| c.listen_address = "0.0.0.0:0".parse().unwrap()).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", any.addr.port()).parse().unwrap();
    let r = request(addr, "GET", "/healthz", &[("Host", "evil.example")]).await;
    assert_eq!(r.status, 200);
    any.stop().await;
}
