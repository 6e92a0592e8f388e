//! `--web.config.file` through the real server: headers, the rate limit, suites and curves
//! in real handshakes, and a changed file taking effect without a restart.

use std::{path::PathBuf, process::Command};

use rustls::{CipherSuite, NamedGroup};

use super::tests::{Reply, TEST_CERT, TEST_KEY, basic, request, start_with, tls_get};
use super::*;
use crate::config::Origin;

/// A private directory for one test's files, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("wirescope-web-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `name` written, loaded as the web config.
    fn config(&self, name: &str, text: &str) -> WebConfig {
        WebConfig::load(&self.write(name, text), Origin::Flag).unwrap()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn serving(cfg: &WebConfig) -> super::tests::Running {
    let cfg = cfg.clone();
    start_with(move |c| {
        *c = c.clone().with_web_config(Some(&cfg)).unwrap();
    })
    .await
}

const HEADERS: &[(&str, &str)] = &[
    (
        "Content-Security-Policy",
        "default-src 'self' *.test.example.net",
    ),
    (
        "Strict-Transport-Security",
        "max-age=31536000; includeSubDomains",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "deny"),
    ("X-XSS-Protection", "1"),
];

fn assert_headers(r: &Reply, what: &str) {
    for (name, value) in HEADERS {
        assert_eq!(r.header(name), Some(*value), "{what}: {name}");
    }
}

/// The toolkit's headers file: each header, its value byte for byte, on 200, 404 and 401.
#[tokio::test]
async fn headers_on_every_response() {
    let dir = Dir::new("headers");
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let cfg = dir.config(
        "web.yml",
        &format!(
            "http_server_config:\n  headers:\n    X-Frame-Options: deny\n    Strict-Transport-Security: max-age=31536000; includeSubDomains\n    X-Content-Type-Options: nosniff\n    X-XSS-Protection: 1\n    Content-Security-Policy: \"default-src 'self' *.test.example.net\"\nbasic_auth_users:\n  prometheus: {hash}\n"
        ),
    );
    let srv = serving(&cfg).await;
    let ok = basic("prometheus", "s3cret");
    for (path, auth, status) in [
        ("/metrics", Some(ok.as_str()), 200),
        ("/nope", Some(ok.as_str()), 404),
        ("/metrics", None, 401),
    ] {
        let extra: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let r = request(srv.addr, "GET", path, &extra).await;
        assert_eq!(r.status, status, "{path}");
        assert_headers(&r, path);
    }
    srv.stop().await;
}

/// rate_limit interval 1h, burst 3: three requests pass, whatever their path or answer,
/// and the next ones get 429 with the configured headers.
#[tokio::test]
async fn rate_limit_429_after_the_burst() {
    let dir = Dir::new("rate");
    let cfg = dir.config(
        "web.yml",
        "rate_limit:\n  interval: 1h\n  burst: 3\nhttp_server_config:\n  headers:\n    X-Frame-Options: sameorigin\n",
    );
    let srv = serving(&cfg).await;
    let mut got = Vec::new();
    for path in ["/healthz", "/nope", "/metrics", "/metrics", "/"] {
        let r = request(srv.addr, "GET", path, &[]).await;
        assert_eq!(r.header("X-Frame-Options"), Some("sameorigin"), "{path}");
        got.push((r.status, r.body));
    }
    assert_eq!(got[0].0, 200);
    assert_eq!(got[1].0, 404);
    assert_eq!(got[2].0, 200);
    assert_eq!(got[3], (429, "Too Many Requests\n".to_string()));
    assert_eq!(got[4], (429, "Too Many Requests\n".to_string()));
    srv.stop().await;
}

/// A new password written to the file applies to the next request, without a restart; a
/// broken file leaves the last good settings in force; a header added applies too.
#[tokio::test]
async fn changed_password_takes_effect_without_restart() {
    let dir = Dir::new("reload");
    let users = |pw: &str| {
        format!(
            "basic_auth_users:\n  prometheus: {}\n",
            bcrypt::hash(pw, 4).unwrap()
        )
    };
    let cfg = dir.config("web.yml", &users("old"));
    let srv = serving(&cfg).await;
    let status = |pw: &'static str| {
        let a = srv.addr;
        async move {
            let auth = basic("prometheus", pw);
            request(a, "GET", "/metrics", &[("Authorization", &auth)]).await
        }
    };
    assert_eq!(status("old").await.status, 200);
    assert_eq!(status("new").await.status, 401);

    dir.write(
        "web.yml",
        &format!(
            "{}http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n",
            users("new")
        ),
    );
    let r = status("new").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(status("old").await.status, 401);

    // Broken: the previous settings stay (and the answer is not a 500).
    dir.write("web.yml", "basic_auth_users:\n  prometheus: plaintext\n");
    assert_eq!(status("new").await.status, 200);
    assert_eq!(status("old").await.status, 401);
    dir.write("web.yml", "");
    // An empty file turns auth off.
    let r = request(srv.addr, "GET", "/metrics", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-Content-Type-Options"), None);
    srv.stop().await;
}

/// A self-signed certificate for localhost made by openssl: (cert PEM, key PEM).
fn new_cert(dir: &Dir) -> (String, String) {
    let (c, k) = (dir.0.join("new-cert.pem"), dir.0.join("new-key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        // Otherwise openssl marks it a CA, which rustls refuses as a server certificate.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&k)
        .arg("-out")
        .arg(&c)
        .output()
        .expect("openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        std::fs::read_to_string(c).unwrap(),
        std::fs::read_to_string(k).unwrap(),
    )
}

/// A renewed certificate (same file names) is served on the next connection.
#[tokio::test]
async fn renewed_certificate_applies_to_new_connections() {
    let dir = Dir::new("renew");
    dir.write("cert.pem", TEST_CERT);
    dir.write("key.pem", TEST_KEY);
    let cfg = dir.config(
        "web.yml",
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n",
    );
    let srv = serving(&cfg).await;
    let (cert, key) = new_cert(&dir);
    let v13 = [&rustls::version::TLS13];
    let r = tls_get(srv.addr, TEST_CERT, &v13, "/", &[]).await.unwrap();
    assert_eq!(r.reply.status, 200);
    assert!(tls_get(srv.addr, &cert, &v13, "/", &[]).await.is_err());

    dir.write("key.pem", &key);
    dir.write("cert.pem", &cert);
    let r = tls_get(srv.addr, &cert, &v13, "/", &[]).await.unwrap();
    assert_eq!(r.reply.status, 200);
    assert!(tls_get(srv.addr, TEST_CERT, &v13, "/", &[]).await.is_err());
    srv.stop().await;
}

/// cipher_suites, curve_preferences and prefer_server_cipher_suites in real handshakes
/// with a client offering rustls' defaults in its order (ECDSA AES-256, AES-128, ChaCha).
#[tokio::test]
async fn suites_and_curves_negotiated_as_configured() {
    let dir = Dir::new("suites");
    dir.write("cert.pem", TEST_CERT);
    dir.write("key.pem", TEST_KEY);
    let v12 = [&rustls::version::TLS12];
    let v13 = [&rustls::version::TLS13];
    let cases: &[(
        &str,
        &[&'static rustls::SupportedProtocolVersion],
        CipherSuite,
        NamedGroup,
    )] = &[
        // The server's order wins (the default).
        (
            "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n  curve_preferences: [CurveP384]\n",
            &v12,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            NamedGroup::secp384r1,
        ),
        // The client's order wins.
        (
            "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n  prefer_server_cipher_suites: false\n",
            &v12,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            NamedGroup::X25519,
        ),
        // A TLS 1.3 suite named restricts TLS 1.3.
        (
            "  cipher_suites: [TLS_CHACHA20_POLY1305_SHA256]\n  curve_preferences: [CurveP256]\n",
            &v13,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            NamedGroup::secp256r1,
        ),
        // Only TLS 1.2 suites named (a Go config): TLS 1.3 as by default.
        (
            "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256]\n",
            &v13,
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            NamedGroup::X25519,
        ),
    ];
    for (i, (extra, versions, suite, group)) in cases.iter().enumerate() {
        let cfg = dir.config(
            &format!("web{i}.yml"),
            &format!("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n{extra}"),
        );
        let srv = serving(&cfg).await;
        let r = tls_get(srv.addr, TEST_CERT, versions, "/", &[])
            .await
            .unwrap();
        assert_eq!((r.suite, r.group), (*suite, Some(*group)), "{extra}");
        assert_eq!(r.reply.status, 200);
        srv.stop().await;
    }
}

/// The toolkit's example file served: HTTPS with its certificate, its users required.
#[tokio::test]
async fn the_toolkit_example_is_served() {
    let dir = Dir::new("example");
    dir.write("server.crt", TEST_CERT);
    dir.write("server.key", TEST_KEY);
    let cfg = dir.config(
        "web-config.yml",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\nbasic_auth_users:\n  alice: $2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze\n  bob: $2y$10$hLqFl9jSjoAAy95Z/zw8Ye8wkdMBM8c5Bn1ptYqP/AXyV0.oy0S8m\n",
    );
    let srv = serving(&cfg).await;
    let v = [&rustls::version::TLS13];
    let r = tls_get(srv.addr, TEST_CERT, &v, "/metrics", &[])
        .await
        .unwrap();
    assert_eq!(r.reply.status, 401);
    let wrong = basic("alice", "not-her-password");
    let r = tls_get(
        srv.addr,
        TEST_CERT,
        &v,
        "/metrics",
        &[("Authorization", &wrong)],
    )
    .await
    .unwrap();
    assert_eq!(r.reply.status, 401);
    let r = request(srv.addr, "GET", "/metrics", &[]).await;
    assert_eq!(r.status, 400);
    srv.stop().await;
}
