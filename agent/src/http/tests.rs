use std::{sync::Mutex, time::Instant};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::oneshot,
};

use super::*;

/// A source whose answers the test controls.
#[derive(Default)]
struct Fake {
    unhealthy: Mutex<Option<String>>,
    metrics_error: Mutex<Option<String>>,
}

impl HttpSource for Fake {
    fn metrics(&self, format: Format) -> Result<String, String> {
        if let Some(e) = self.metrics_error.lock().unwrap().clone() {
            return Err(e);
        }
        Ok(match format {
            Format::OpenMetrics => "# TYPE x counter\nx_total 1\n# EOF\n".into(),
            Format::Prometheus => "# TYPE x_total counter\nx_total 1\n".into(),
        })
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

struct Running {
    addr: SocketAddr,
    fake: Arc<Fake>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), HttpError>>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }
}

async fn start_with(cfg: impl FnOnce(&mut HttpConfig)) -> Running {
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

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection, `Connection: close`, read to the end.
async fn request(addr: SocketAddr, method: &str, path: &str, extra: &[(&str, &str)]) -> Reply {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
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

fn parse(raw: &[u8]) -> Reply {
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
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
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
    assert_eq!(r.header("vary"), Some("Accept"));

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
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
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
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n")
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
    let req = format!("GET /metrics HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n");
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

#[tokio::test]
async fn connections_are_limited() {
    let srv = start_with(|c| {
        c.max_connections = 1;
        c.header_read_timeout = Duration::from_millis(500);
    })
    .await;
    // Holds the only slot until the header timeout frees it.
    let _hog = TcpStream::connect(srv.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let r = request(srv.addr, "GET", "/healthz", &[]).await;
    assert_eq!(r.status, 200);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "served after {waited:?}: the limit did not hold"
    );
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish() {
    struct Slow;
    impl HttpSource for Slow {
        fn metrics(&self, _: Format) -> Result<String, String> {
            std::thread::sleep(Duration::from_millis(300));
            Ok("slow 1\n".into())
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
