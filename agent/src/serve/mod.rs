//! The HTTP server: the metrics path, `/` (a landing page), `/healthz` and `/api/v1/status`.
//!
//! hyper's HTTP/1 server, bounded so that clients cannot tie it up: at most
//! `max_connections` connections at once (one past it is answered 503 and closed at once,
//! never left in the listen backlog, where a health probe would queue behind it), request
//! headers must arrive within `header_read_timeout` (this also closes idle keep-alive
//! connections), headers are capped at 16 KiB, request bodies are never read, and a
//! connection is retired after `max_connection_age` (its in-flight request still finishes),
//! and one whose response makes no progress for `write_timeout` is closed ([`timed`]).
//!
//! The metrics body is gzip-compressed when the scraper accepts gzip (Prometheus always
//! does), as client_golang's handler does: a 10,000-peer body shrinks about tenfold. An
//! uncompressed one is held LZ4-packed and unpacked as the client reads it ([`packed`]).
//!
//! With `--web.config.file` ([`web`]): HTTPS (the TLS handshake must also finish within
//! `header_read_timeout`), basic auth on every path, response headers and a rate limit
//! (429 past it, before anything else is looked at); the file is re-read when it changes
//! ([`live`]).

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

pub mod live;
mod packed;
mod scrape;
pub mod status;
mod timed;

use crate::{
    config::{WebConfig, web::WebSecurity},
    metrics::Format,
};

/// What the server shows; the agent implements it over its state.
pub trait HttpSource: Send + Sync + 'static {
    /// Writes the whole metrics body in `format` to `out` (see [`crate::metrics::encode`]);
    /// an error becomes a 500 with the message.
    fn metrics(&self, format: Format, out: &mut dyn std::fmt::Write) -> Result<(), String>;
    /// `Ok` while the programs are attached and the last collection succeeded; otherwise
    /// why not, served with 503. Called on the async workers, so it must not wait for a
    /// lock a scrape or a sync may hold (the agent's uses try_lock and what it saw last).
    fn health(&self) -> Result<(), String>;
    /// The snapshot `wirescope status` prints.
    fn status(&self) -> serde_json::Value;
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub listen_address: SocketAddr,
    pub telemetry_path: String,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_connection_age: Duration,
    /// A connection whose response makes no progress for this long is closed (a client
    /// that does not read).
    pub write_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// TLS, basic auth, headers, rate limit (`--web.config.file`); none by default.
    pub web: WebSecurity,
    /// The web config `web` was built from, re-read when its files change.
    pub web_config: Option<WebConfig>,
    /// On a loopback listener, the names besides localhost and loopback addresses that
    /// requests' Host header may carry (`--web.allowed-host`; lower case).
    pub allowed_hosts: Vec<String>,
}

impl HttpConfig {
    pub fn new(listen_address: SocketAddr, telemetry_path: impl Into<String>) -> Self {
        HttpConfig {
            listen_address,
            telemetry_path: telemetry_path.into(),
            // Scrapers keep one connection each, and concurrent scrapes share one body
            // (scrape.rs), so a connection costs a socket and a few KiB: room for a scrape
            // storm and hundreds of clients that hold connections without sending
            // (slowloris, each until header_read_timeout) or without reading (until
            // write_timeout), while a flood past it cannot exhaust file descriptors (the
            // agent raises its soft limit to the hard one at start, 524,288 under systemd).
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            // Longer than any sane scrape interval's idle time is cut anyway by the header
            // timeout; this bounds slow readers.
            max_connection_age: Duration::from_secs(300),
            // Prometheus gives up on a scrape after 10 s by default; no progress at all for
            // three times that is a client that is gone or stalling on purpose.
            write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            web: WebSecurity::default(),
            web_config: None,
            allowed_hosts: Vec::new(),
        }
    }

    /// Turns on what `web` (the parsed `--web.config.file`) asks for.
    pub fn with_web_config(mut self, web: Option<&WebConfig>) -> Result<Self, HttpError> {
        if let Some(w) = web {
            self.web = WebSecurity::from_config(w).map_err(HttpError::Web)?;
            self.web_config = Some(w.clone());
        }
        Ok(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "cannot listen on {addr}: {error}{}",
        if error.kind() == io::ErrorKind::AddrInUse {
            " (is another wirescope or exporter running? pick another port with --web.listen-address)"
        } else if error.kind() == io::ErrorKind::AddrNotAvailable {
            " (no local interface has that address)"
        } else if error.kind() == io::ErrorKind::PermissionDenied {
            " (ports below 1024 need CAP_NET_BIND_SERVICE)"
        } else {
            ""
        }
    )]
    // Not `source`: the message already says it, and error chains would print it twice.
    Bind { addr: SocketAddr, error: io::Error },
    #[error("--web.config.file: {0}")]
    Web(String),
}

/// A bound, not yet serving, server: binding first lets the caller fail early (exit status)
/// and learn the port when it asked for port 0.
pub struct Server {
    listener: TcpListener,
    cfg: HttpConfig,
}

/// Binds `cfg.listen_address`. `[::]` listens on IPv4 too (IPV6_V6ONLY off); on a host
/// without IPv6 it falls back to 0.0.0.0.
pub async fn bind(cfg: HttpConfig) -> Result<Server, HttpError> {
    let addr = cfg.listen_address;
    let listener = match listen(addr) {
        Err(e)
            if addr.ip().is_unspecified()
                && addr.is_ipv6()
                && e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            listen(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()))
        }
        r => r,
    }
    .map_err(|error| HttpError::Bind { addr, error })?;
    Ok(Server { listener, cfg })
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    // So a restarted agent can rebind while old connections sit in TIME_WAIT; on Linux this
    // does not let two listeners share the port.
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    // Past the default 1024: a scrape storm (1,000 scrapers and stalled clients at once) must
    // not overflow the accept queue, where a dropped SYN costs its client a 1 s retransmit
    // (the kernel caps this at net.core.somaxconn, 4096 by default).
    sock.listen(4096)?;
    sock.set_nonblocking(true)?;
    TcpListener::from_std(sock.into())
}

/// Binds and serves until `shutdown` completes.
pub async fn serve(
    cfg: HttpConfig,
    source: Arc<dyn HttpSource>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), HttpError> {
    bind(cfg).await?.serve(source, shutdown).await
}

struct Ctx {
    source: Arc<dyn HttpSource>,
    telemetry_path: String,
    web: Arc<live::LiveWeb>,
    /// Shared metrics bodies, by [`body_kind`].
    bodies: [scrape::Coalescer<MetricsBody>; 4],
    /// On a loopback listener: the Host names allowed besides localhost and loopback
    /// addresses. None elsewhere.
    hosts: Option<Vec<String>>,
}

/// A rendered metrics body, shared by the scrapes that asked for it together.
#[derive(Clone)]
enum MetricsBody {
    Gzip(Bytes),
    Plain(Arc<packed::Packed>),
}

/// The index of a kind of metrics body in [`Ctx::bodies`].
fn body_kind(format: Format, gzip: bool) -> usize {
    usize::from(format == Format::Prometheus) * 2 + usize::from(gzip)
}

/// What a plain-HTTP client gets from a TLS listener (as Go's net/http answers it).
const PLAIN_TO_TLS: &[u8] = b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n";

/// Serves one connection until it ends, the server stops (`stop`) or it reaches `age`.
async fn drive<I>(
    builder: http1::Builder,
    io: I,
    ctx: Arc<Ctx>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    age: Duration,
    grace: Duration,
    peer: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(route(&ctx, req).await) }
    });
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!("http: connection from {peer}: {e}");
            }
            return;
        }
        _ = stop.changed() => {}
        _ = tokio::time::sleep(age) => {}
    }
    // Finish the request in flight, then close.
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(grace, conn).await;
}

/// The TLS handshake on `stream`, within `timeout`; a client that speaks plain HTTP gets
/// [`PLAIN_TO_TLS`]. None when there is no TLS connection to serve.
async fn tls_accept(
    acceptor: tokio_rustls::TlsAcceptor,
    mut stream: TcpStream,
    timeout: Duration,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let handshake = async {
        // A TLS connection starts with a handshake record (22); a letter is an HTTP method.
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await.ok()? == 0 {
            return None;
        }
        if first[0].is_ascii_alphabetic() {
            debug!("http: plain HTTP from {peer} to the TLS listener: 400");
            let _ = stream.write_all(PLAIN_TO_TLS).await;
            let _ = stream.shutdown().await;
            return None;
        }
        match acceptor.accept(stream).await {
            Ok(s) => Some(s),
            Err(e) => {
                debug!("http: TLS handshake with {peer}: {e}");
                None
            }
        }
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .ok()
        .flatten()
}

/// What a connection past `max_connections` gets: a 503 that says why, then the close.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 47\r\nRetry-After: 1\r\nConnection: close\r\n\r\ntoo many open connections to this agent: retry\n";

/// Answers a connection past the cap with [`BUSY`] (plain HTTP only: a TLS client could not
/// read it) and closes it. The client's request is read off (for at most `linger`) before
/// the close: closing a socket with unread data sends a reset, which can make the client
/// lose the answer it has not read yet.
async fn refuse(mut stream: TcpStream, linger: Duration, plain: bool) {
    use tokio::io::AsyncReadExt as _;
    let close = async {
        if plain {
            stream.write_all(BUSY).await?;
        }
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        // Up to 64 KiB: a request's headers, never an upload.
        for _ in 0..16 {
            if stream.read(&mut sink).await? == 0 {
                break;
            }
        }
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(linger.min(Duration::from_secs(2)), close).await;
}

/// Connections refused at the cap since the last warning: one warning a minute at most.
#[derive(Default)]
struct Refusals {
    since_warned: u64,
    warned_at: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, peer: SocketAddr, max: usize) {
        self.since_warned += 1;
        if self
            .warned_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            debug!("http: refused {peer}: {max} connections open");
            return;
        }
        warn!(
            "http: {} connection(s) refused with 503 (the last from {peer}): {max} connections \
             are open, the most this agent serves at once",
            self.since_warned
        );
        self.since_warned = 0;
        self.warned_at = Some(Instant::now());
    }
}

impl Server {
    /// `https` with TLS configured, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.cfg.web.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.cfg.listen_address)
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests
    /// finish (up to `shutdown_grace`) and returns.
    pub async fn serve(
        self,
        source: Arc<dyn HttpSource>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), HttpError> {
        let Server { listener, cfg } = self;
        let web = Arc::new(match &cfg.web_config {
            Some(w) => live::LiveWeb::watching(cfg.web.clone(), w),
            None => live::LiveWeb::fixed(cfg.web.clone()),
        });
        let ctx = Arc::new(Ctx {
            source,
            telemetry_path: cfg.telemetry_path.clone(),
            web: web.clone(),
            bodies: Default::default(),
            hosts: cfg
                .listen_address
                .ip()
                .is_loopback()
                .then(|| cfg.allowed_hosts.clone()),
        });
        let tls_at_start = cfg.web.tls.clone();
        let max = cfg.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        // Each connection holds a permit; taking all of them back at the end waits for the
        // connections to finish.
        let permits = Arc::new(Semaphore::new(max));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .max_buf_size(16 * 1024)
            .keep_alive(true);
        tokio::pin!(shutdown);
        let mut refused = Refusals::default();

        loop {
            // Always accept, also at the cap: a connection left in the listen backlog would
            // hold every one behind it (a /healthz probe among them) until a slot frees.
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!("http: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                refused.note(peer, max);
                tokio::spawn(refuse(
                    stream,
                    cfg.header_read_timeout,
                    tls_at_start.is_none(),
                ));
                continue;
            };
            let ctx = ctx.clone();
            let stop = stop_rx.clone();
            let (age, grace) = (cfg.max_connection_age, cfg.shutdown_grace);
            let builder = builder.clone();
            let tls = tls_at_start.clone();
            let web = web.clone();
            let handshake_timeout = cfg.header_read_timeout;
            let write_timeout = cfg.write_timeout;
            tokio::spawn(async move {
                let _permit = permit;
                // The settings in force for this connection: a re-read file's certificate.
                let tls = match tls {
                    Some(first) => Some(web.current().await.tls.clone().unwrap_or(first)),
                    None => None,
                };
                match tls.map(tokio_rustls::TlsAcceptor::from) {
                    None => {
                        let io = TokioIo::new(timed::WriteTimeout::new(stream, write_timeout));
                        drive(builder, io, ctx, stop, age, grace, peer).await
                    }
                    // Boxed: a TLS connection's futures are several KiB bigger, and the
                    // task is sized for its largest state; plain connections, which a
                    // storm is made of, should not carry that.
                    Some(acceptor) => {
                        Box::pin(async move {
                            if let Some(s) =
                                tls_accept(acceptor, stream, handshake_timeout, peer).await
                            {
                                let io = TokioIo::new(timed::WriteTimeout::new(s, write_timeout));
                                drive(builder, io, ctx, stop, age, grace, peer).await
                            }
                        })
                        .await
                    }
                }
            });
        }

        drop(listener);
        let _ = stop_tx.send(true);
        let all = u32::try_from(max).unwrap_or(u32::MAX);
        if tokio::time::timeout(cfg.shutdown_grace, permits.acquire_many(all))
            .await
            .is_err()
        {
            warn!(
                "http: connections still open after {:?}; closing anyway",
                cfg.shutdown_grace
            );
        }
        Ok(())
    }
}

/// Every answer is one buffer, but an uncompressed metrics body ([`packed`]).
type Resp = Response<Either<Full<Bytes>, packed::Unpacking>>;

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    with_body(status, content_type, Either::Left(Full::new(body.into())))
}

fn with_body(
    status: StatusCode,
    content_type: &'static str,
    body: Either<Full<Bytes>, packed::Unpacking>,
) -> Resp {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut body = body.into();
    body.push('\n');
    respond(status, "text/plain; charset=utf-8", body)
}

fn unauthorized() -> Resp {
    let mut r = text(StatusCode::UNAUTHORIZED, "Unauthorized");
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"wirescope\", charset=\"UTF-8\""),
    );
    r
}

fn too_many_requests() -> Resp {
    text(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests")
}

async fn route(ctx: &Ctx, req: Request<Incoming>) -> Resp {
    let web = ctx.web.current().await;
    // As the toolkit: every request counts against the limit, before anything else costs.
    let mut r = if web.rate_limit.as_ref().is_some_and(|b| !b.allow()) {
        too_many_requests()
    } else {
        answer(ctx, &web, req).await
    };
    for (name, value) in &web.headers {
        r.headers_mut().insert(name.clone(), value.clone());
    }
    r
}

async fn answer(ctx: &Ctx, web: &WebSecurity, req: Request<Incoming>) -> Resp {
    // Before the credentials: a rebinding page must not get to make the agent run bcrypt.
    if let Some(allowed) = &ctx.hosts {
        let host = req
            .headers()
            .get(header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
        if !host_allowed(host.as_deref(), allowed) {
            let host = host.unwrap_or_default();
            debug!("http: refused Host {host:?} on a loopback listener");
            return text(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "Host {host:?} is not this agent's address: on loopback it answers only \
                     requests for localhost or a loopback address (a web page could otherwise \
                     read it through DNS rebinding); allow a name with --web.allowed-host"
                ),
            );
        }
    }
    // Every path, known or not, needs the credentials when users are configured.
    if let Some(auth) = &web.auth {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if !auth.check(given).await {
            return unauthorized();
        }
    }
    let path = req.uri().path();
    let known = path == ctx.telemetry_path || matches!(path, "/" | "/healthz" | "/api/v1/status");
    if !known {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if path == ctx.telemetry_path {
        return metrics(ctx, &req).await;
    }
    match path {
        "/" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            landing_page(&ctx.telemetry_path),
        ),
        // Inline: no hand-off to the blocking pool, whose threads a storm keeps busy.
        "/healthz" => match ctx.source.health() {
            Ok(()) => text(StatusCode::OK, "ok"),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, why),
        },
        _ => {
            let source = ctx.source.clone();
            match tokio::task::spawn_blocking(move || source.status()).await {
                Ok(v) => {
                    let mut body = serde_json::to_string_pretty(&v).unwrap_or_else(|e| {
                        serde_json::json!({ "error": e.to_string() }).to_string()
                    });
                    body.push('\n');
                    respond(StatusCode::OK, "application/json", body)
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("status failed: {e}"),
                ),
            }
        }
    }
}

async fn metrics(ctx: &Ctx, req: &Request<Incoming>) -> Resp {
    // Several Accept headers mean the same as one joined with commas.
    let accept: Vec<&str> = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let accept = accept.join(",");
    let format = Format::negotiate((!accept.is_empty()).then_some(accept.as_str()));
    let gzip = accepts_gzip(
        req.headers()
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let source = ctx.source.clone();
    // Collectors read BPF maps and take locks, compression takes CPU: keep both off the
    // async workers, and share one body between the scrapes that arrive together.
    let collected = ctx.bodies[body_kind(format, gzip)]
        .get(Instant::now(), || async move {
            let rendered = tokio::task::spawn_blocking(move || -> Result<MetricsBody, String> {
                if !gzip {
                    let mut p = packed::Packer::default();
                    let written = source.metrics(format, &mut p);
                    let body = p
                        .finish()
                        .map_err(|_| "packing the metrics body failed".to_owned())?;
                    return written.map(|()| MetricsBody::Plain(Arc::new(body)));
                }
                // The text goes through the compressor as it is written, so a 200,000-series
                // body (~30 MB) never exists whole beside its compressed form.
                let mut z = GzipText::new();
                let written = source.metrics(format, &mut z);
                // Compressing into memory cannot fail in practice; were it to, the scrape
                // fails rather than getting a body its headers misdescribe.
                let body = z
                    .finish()
                    .map_err(|e| format!("gzip of the metrics body failed: {e}"))?;
                written.map(|()| MetricsBody::Gzip(Bytes::from(body)))
            })
            .await;
            rendered.unwrap_or_else(|e| Err(e.to_string()))
        })
        .await;
    let mut r = match collected {
        Ok(MetricsBody::Gzip(body)) => {
            let mut r = respond(StatusCode::OK, format.content_type(), body);
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            r
        }
        Ok(MetricsBody::Plain(body)) => with_body(
            StatusCode::OK,
            format.content_type(),
            Either::Right(body.body()),
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("collecting metrics failed: {e}"),
        ),
    };
    r.headers_mut().insert(
        header::VARY,
        HeaderValue::from_static("Accept, Accept-Encoding"),
    );
    r
}

/// Whether a loopback listener answers a request whose Host header is `host`: localhost
/// (and names under .localhost, which resolve only to loopback), a loopback address, or
/// one of `allowed`; with any port. A request without Host (HTTP/1.0) is answered: browsers
/// always send one.
fn host_allowed(host: Option<&str>, allowed: &[String]) -> bool {
    let Some(host) = host else {
        return true;
    };
    let host = host.trim();
    // [v6]:port, [v6], name:port, v4:port, name.
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, tail)) if tail.is_empty() || tail.starts_with(':') => inside,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((n, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => n,
            Some((_, "")) => return false,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return false;
    }
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return ip.is_loopback() || allowed.iter().any(|a| a.parse() == Ok(ip));
    }
    name == "localhost" || name.ends_with(".localhost") || allowed.contains(&name)
}

/// Whether Accept-Encoding values allow gzip: a `gzip` or `x-gzip` coding (or `*`) whose
/// q-value is not 0 (RFC 9110 12.5.3).
fn accepts_gzip<'a>(values: impl Iterator<Item = &'a str>) -> bool {
    let mut star = None;
    for part in values.flat_map(|v| v.split(',')) {
        let mut it = part.split(';');
        let coding = it.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = it
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match coding.as_str() {
            "gzip" | "x-gzip" => return q > 0.0,
            "*" => star = Some(q > 0.0),
            _ => {}
        }
    }
    star.unwrap_or(false)
}

/// A `fmt::Write` that gzips what is written to it: the encoders write label by label, so
/// the text is gathered in a buffer and compressed a buffer at a time.
struct GzipText {
    z: flate2::write::GzEncoder<Vec<u8>>,
    buf: String,
    failed: Option<io::Error>,
}

impl GzipText {
    const BUF: usize = 64 * 1024;

    fn new() -> Self {
        Self {
            z: flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()),
            buf: String::with_capacity(Self::BUF),
            failed: None,
        }
    }

    fn flush(&mut self) -> std::fmt::Result {
        use std::io::Write as _;
        if let Err(e) = self.z.write_all(self.buf.as_bytes()) {
            self.failed = Some(e);
            return Err(std::fmt::Error);
        }
        self.buf.clear();
        Ok(())
    }

    /// The compressed body, or the first error of the compressor.
    fn finish(mut self) -> io::Result<Vec<u8>> {
        if self.failed.is_none() {
            let _ = self.flush();
        }
        match self.failed {
            Some(e) => Err(e),
            None => self.z.finish(),
        }
    }
}

impl std::fmt::Write for GzipText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.failed.is_some() {
            return Err(std::fmt::Error);
        }
        self.buf.push_str(s);
        if self.buf.len() >= Self::BUF {
            self.flush()?;
        }
        Ok(())
    }
}

fn landing_page(telemetry_path: &str) -> String {
    let p = html_escape(telemetry_path);
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>wirescope</title></head>\n\
         <body>\n<h1>wirescope {version}</h1>\n\
         <p>eBPF agent that measures what a WireGuard tunnel costs and where it breaks.</p>\n<ul>\n\
         <li><a href=\"{p}\">{p}</a>: metrics (OpenMetrics, or Prometheus text 0.0.4)</li>\n\
         <li><a href=\"/healthz\">/healthz</a>: health</li>\n\
         <li><a href=\"/api/v1/status\">/api/v1/status</a>: status snapshot (JSON)</li>\n\
         </ul>\n</body>\n</html>\n",
        version = env!("CARGO_PKG_VERSION"),
    )
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod web_tests;
