//! `--web.config.file`: the exporter-toolkit's own example and test files, and each key
//! with exact expectations.

use std::time::Duration;

use rustls::CipherSuite;

use super::tests::{Dir, HASH, TEST_CERT, TEST_KEY};
use super::{Origin, Pem, RateLimit, WebConfig, web, webfile::parse_go_duration};

/// exporter-toolkit's docs/web-config.yml as released (Apache-2.0, the Prometheus
/// Authors), byte for byte: its server.crt and server.key are the fixture here.
const TOOLKIT_EXAMPLE: &str = "# TLS and basic authentication configuration example.\n#\n# Additionally, a certificate and a key file are needed.\ntls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\n# Usernames and passwords required to connect.\n# Passwords are hashed with bcrypt: https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md#about-bcrypt.\nbasic_auth_users:\n  alice: $2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze\n  bob: $2y$10$hLqFl9jSjoAAy95Z/zw8Ye8wkdMBM8c5Bn1ptYqP/AXyV0.oy0S8m\n";

/// exporter-toolkit's web/testdata/web_config_headers.good.yml.
const TOOLKIT_HEADERS: &str = "http_server_config:\n  headers:\n    X-Frame-Options: deny\n    Strict-Transport-Security: max-age=31536000; includeSubDomains\n    X-Content-Type-Options: nosniff\n    X-XSS-Protection: 1\n    Content-Security-Policy: \"default-src 'self' *.test.example.net\"\n";

fn load(dir: &Dir, name: &str, text: &str) -> Result<WebConfig, String> {
    let f = dir.file(name, text);
    WebConfig::load(f.as_ref(), Origin::Flag).map_err(|e| e.to_string())
}

/// The error for `text`, without the `--web.config.file: PATH: ` every one starts with.
fn refused(dir: &Dir, name: &str, text: &str) -> String {
    let f = dir.file(name, text);
    let msg = WebConfig::load(f.as_ref(), Origin::Flag)
        .map(|c| format!("accepted: {c:?}"))
        .unwrap_or_else(|e| e.to_string());
    let prefix = format!("--web.config.file: {f}: ");
    msg.strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{text:?}: {msg}"))
        .to_owned()
}

fn tls_yaml(extra: &str) -> String {
    format!("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n{extra}")
}

fn with_certs(tag: &str) -> Dir {
    let dir = Dir::new(tag);
    dir.file("cert.pem", TEST_CERT);
    dir.file("key.pem", TEST_KEY);
    dir
}

#[test]
fn the_toolkit_example_loads() {
    let dir = Dir::new("toolkit-example");
    dir.file("server.crt", TEST_CERT);
    dir.file("server.key", TEST_KEY);
    let c = load(&dir, "web-config.yml", TOOLKIT_EXAMPLE).unwrap();
    let tls = c.tls.as_ref().unwrap();
    assert_eq!(tls.cert, Pem::File(dir.0.join("server.crt")));
    assert_eq!(tls.key, Pem::File(dir.0.join("server.key")));
    assert_eq!(tls.client_auth_type, "NoClientCert");
    assert!(tls.prefer_server_cipher_suites);
    assert_eq!(
        c.basic_auth_users.keys().collect::<Vec<_>>(),
        ["alice", "bob"]
    );
    assert_eq!(
        c.basic_auth_users["alice"],
        "$2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze"
    );
    assert_eq!(
        c.files(),
        [
            dir.0.join("web-config.yml"),
            dir.0.join("server.crt"),
            dir.0.join("server.key")
        ]
    );
    let sec = web::WebSecurity::from_config(&c).unwrap();
    assert!(sec.tls.is_some() && sec.auth.is_some());
}

#[test]
fn headers_as_the_toolkit_checks_them() {
    let dir = Dir::new("headers");
    let c = load(&dir, "good.yml", TOOLKIT_HEADERS).unwrap();
    let got: Vec<(&str, &str)> = c
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "Content-Security-Policy",
                "default-src 'self' *.test.example.net"
            ),
            (
                "Strict-Transport-Security",
                "max-age=31536000; includeSubDomains"
            ),
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "deny"),
            ("X-XSS-Protection", "1"),
        ]
    );
    let sec = web::WebSecurity::from_config(&c).unwrap();
    assert_eq!(sec.headers.len(), 5);
    assert_eq!(sec.headers[3].0, "x-frame-options");
    assert_eq!(sec.headers[3].1, "deny");

    // The toolkit's three bad files, then case and blank values.
    let allowed = "allowed: Content-Security-Policy, Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options, X-XSS-Protection";
    let cases: &[(&str, String)] = &[
        (
            "http_server_config:\n  headers:\n    Content-Type: foo\n",
            format!("http_server_config.headers: HTTP header \"Content-Type\" can not be configured; {allowed}"),
        ),
        (
            "http_server_config:\n  headers:\n    X-Frame-Options: foo\n",
            "http_server_config.headers: invalid value for X-Frame-Options: expected one of [\"deny\", \"sameorigin\"], got \"foo\"".into(),
        ),
        (
            "http_server_config:\n  headers:\n    X-Content-Type-Options: sniff\n",
            "http_server_config.headers: invalid value for X-Content-Type-Options: expected one of [\"nosniff\"], got \"sniff\"".into(),
        ),
        (
            "http_server_config:\n  headers:\n    X-Frame-Options: DENY\n",
            "http_server_config.headers: invalid value for X-Frame-Options: expected one of [\"deny\", \"sameorigin\"], got \"DENY\"".into(),
        ),
        (
            "http_server_config:\n  headers:\n    x-frame-options: deny\n",
            format!("http_server_config.headers: HTTP header \"x-frame-options\" can not be configured; {allowed}"),
        ),
        (
            "http_server_config:\n  headers:\n    X-Frame-Options: \"\"\n",
            "http_server_config.headers: invalid value for X-Frame-Options: expected one of [\"deny\", \"sameorigin\"], got \"\"".into(),
        ),
        (
            "http_server_config:\n  headers:\n    Content-Security-Policy: \"a\\r\\nSet-Cookie: x\"\n",
            "http_server_config.headers: the value of Content-Security-Policy is not valid in an HTTP header (control characters or line breaks): \"a\\r\\nSet-Cookie: x\"".into(),
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        assert_eq!(&refused(&dir, &format!("bad{i}.yml"), text), want);
    }
    // "Unset if blank"; sameorigin is the other accepted X-Frame-Options; http2 accepted.
    let c = load(
        &dir,
        "blank.yml",
        "http_server_config:\n  http2: false\n  headers:\n    Content-Security-Policy: \"\"\n    X-Frame-Options: sameorigin\n",
    )
    .unwrap();
    assert_eq!(
        c.headers.into_iter().collect::<Vec<_>>(),
        [("X-Frame-Options".to_string(), "sameorigin".to_string())]
    );
}

#[test]
fn rate_limit_keys() {
    let dir = Dir::new("rate");
    let rl = |text: &str| load(&dir, "r.yml", text).map(|c| c.rate_limit);
    assert_eq!(
        rl("rate_limit:\n  interval: 1s\n  burst: 3\n"),
        Ok(Some(RateLimit {
            interval: Duration::from_secs(1),
            burst: 3
        }))
    );
    assert_eq!(
        rl("rate_limit:\n  interval: 1m30s\n  burst: 1\n"),
        Ok(Some(RateLimit {
            interval: Duration::from_secs(90),
            burst: 1
        }))
    );
    // 0 (with or without a unit) or no interval: off, as in the toolkit.
    assert_eq!(rl("rate_limit:\n  interval: 0\n  burst: 5\n"), Ok(None));
    assert_eq!(rl("rate_limit:\n  interval: 0s\n"), Ok(None));
    assert_eq!(rl("rate_limit:\n  burst: 5\n"), Ok(None));
    assert_eq!(
        refused(&dir, "r1.yml", "rate_limit:\n  interval: 5\n  burst: 1\n"),
        "rate_limit.interval 5 has no unit (Go would read it as 5 nanoseconds); write a duration such as 1s or 100ms"
    );
    assert_eq!(
        refused(&dir, "r2.yml", "rate_limit:\n  interval: 1s\n  burst: 0\n"),
        "rate_limit.burst 0: with an interval set it must be at least 1 (with 0 every request would get 429); set burst to the requests allowed at once, or interval to 0 to turn the limit off"
    );
    assert_eq!(
        refused(&dir, "r3.yml", "rate_limit:\n  interval: 1s\n"),
        "rate_limit.burst 0: with an interval set it must be at least 1 (with 0 every request would get 429); set burst to the requests allowed at once, or interval to 0 to turn the limit off"
    );
    assert_eq!(
        refused(
            &dir,
            "r4.yml",
            "rate_limit:\n  interval: 1 second\n  burst: 1\n"
        ),
        "rate_limit.interval \"1 second\" has an unknown unit \" second\" (ns, us, ms, s, m, h); accepted: a Go duration such as 1s, 100ms, 1m30s or 0 (off)"
    );
    assert!(
        refused(&dir, "r5.yml", "rate_limit:\n  period: 1s\n").contains("unknown field `period`")
    );
}

#[test]
fn go_durations() {
    let ok: &[(&str, u64)] = &[
        ("0", 0),
        ("1s", 1_000_000_000),
        ("+1s", 1_000_000_000),
        ("100ms", 100_000_000),
        ("1.5s", 1_500_000_000),
        (".5m", 30_000_000_000),
        ("1h2m3s4ms5us6ns", 3_723_004_005_006),
        ("2µs", 2_000),
        ("2μs", 2_000),
        ("1.0000000005s", 1_000_000_000),
    ];
    for (s, ns) in ok {
        assert_eq!(parse_go_duration(s), Ok(Duration::from_nanos(*ns)), "{s}");
    }
    let bad: &[(&str, &str)] = &[
        ("", "is not a duration"),
        ("-1s", "is negative"),
        ("1", "has a number without a unit"),
        ("1d", "has an unknown unit \"d\" (ns, us, ms, s, m, h)"),
        ("s", "is not a duration"),
        ("1.2.3s", "is not a duration"),
        ("99999999999999h", "is out of range"),
    ];
    for (s, why) in bad {
        assert_eq!(parse_go_duration(s), Err(why.to_string()), "{s:?}");
    }
}

#[test]
fn inline_pem_and_client_ca() {
    let dir = with_certs("inline");
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    let inline = format!(
        "tls_server_config:\n  cert: |\n{}  key: |\n{}",
        indent(TEST_CERT),
        indent(TEST_KEY)
    );
    let c = load(&dir, "inline.yml", &inline).unwrap();
    let tls = c.tls.as_ref().unwrap();
    assert_eq!(tls.cert, Pem::Inline(TEST_CERT.to_string()));
    assert_eq!(tls.key, Pem::Inline(TEST_KEY.to_string()));
    assert_eq!(c.files(), [dir.0.join("inline.yml")]);
    assert!(!format!("{c:?}").contains("PRIVATE KEY"), "{c:?}");

    // client_ca inline, verified clients required: the CA is the test certificate.
    let c = load(
        &dir,
        "ca.yml",
        &tls_yaml(&format!(
            "  client_auth_type: RequireAndVerifyClientCert\n  client_ca: |\n{}",
            indent(TEST_CERT)
        )),
    )
    .unwrap();
    assert_eq!(
        c.tls.unwrap().client_ca,
        Some(Pem::Inline(TEST_CERT.to_string()))
    );

    let cases: &[(String, &str)] = &[
        (
            format!("{}  cert: |\n{}", tls_yaml(""), indent(TEST_CERT)),
            "cert_file and cert are both set: give the PEM either as a file or inline, not both",
        ),
        (
            tls_yaml(
                "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: cert.pem\n  client_ca: x\n",
            ),
            "client_ca_file and client_ca are both set: give the PEM either as a file or inline, not both",
        ),
        (
            tls_yaml("  client_ca_file: cert.pem\n"),
            "a client CA (client_ca_file or client_ca) is set but client_auth_type is NoClientCert: set client_auth_type to RequireAndVerifyClientCert (or VerifyClientCertIfGiven), or remove the CA",
        ),
        (
            tls_yaml("  client_auth_type: VerifyClientCertIfGiven\n  client_ca: not a pem\n"),
            "client_ca (inline): no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
        ),
        (
            "tls_server_config:\n  cert_file: cert.pem\n  key: not a key\n".into(),
            "key (inline): no items found (a PEM private key is expected: PKCS#8, PKCS#1 or SEC1)",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        assert_eq!(refused(&dir, &format!("bad{i}.yml"), text), *want, "{text}");
    }
}

/// Go's rustls-capable names and the IANA suite each must be.
const MAPPED: &[(&str, CipherSuite)] = &[
    (
        "TLS_AES_128_GCM_SHA256",
        CipherSuite::TLS13_AES_128_GCM_SHA256,
    ),
    (
        "TLS_AES_256_GCM_SHA384",
        CipherSuite::TLS13_AES_256_GCM_SHA384,
    ),
    (
        "TLS_CHACHA20_POLY1305_SHA256",
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
];

const SUPPORTED_SUITES: &str = "TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256";

#[test]
fn each_cipher_suite_mapped_or_refused_by_name() {
    for (go, iana) in MAPPED {
        assert_eq!(web::cipher_suite(go).map(|s| s.suite()), Ok(*iana), "{go}");
    }
    for go in [
        "TLS_RSA_WITH_AES_128_CBC_SHA",
        "TLS_RSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
        "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
        "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
        "TLS_RSA_WITH_RC4_128_SHA",
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
    ] {
        assert_eq!(
            web::cipher_suite(go).map(|s| s.suite()),
            Err(format!(
                "cipher_suites: {go:?} is a Go cipher suite that rustls does not implement (CBC, RC4, 3DES or RSA key exchange); supported: {SUPPORTED_SUITES}"
            ))
        );
    }
    // Go's pre-1.16 alias, and rustls' own spelling of a TLS 1.3 suite: not Go names.
    for name in [
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
        "TLS13_AES_128_GCM_SHA256",
    ] {
        assert_eq!(
            web::cipher_suite(name).map(|s| s.suite()),
            Err(format!(
                "cipher_suites: {name:?} is not a cipher suite name Go or rustls knows; supported: {SUPPORTED_SUITES}"
            ))
        );
    }

    let dir = with_certs("ciphers");
    assert_eq!(
        refused(
            &dir,
            "cbc.yml",
            &tls_yaml(
                "  cipher_suites:\n    - TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\n    - TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA\n"
            )
        ),
        format!(
            "cipher_suites: \"TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA\" is a Go cipher suite that rustls does not implement (CBC, RC4, 3DES or RSA key exchange); supported: {SUPPORTED_SUITES}"
        )
    );
}

#[test]
fn each_curve_mapped_or_refused_by_name() {
    use rustls::NamedGroup;
    for (go, group) in [
        ("CurveP256", NamedGroup::secp256r1),
        ("CurveP384", NamedGroup::secp384r1),
        ("X25519", NamedGroup::X25519),
    ] {
        assert_eq!(web::curve(go).map(|g| g.name()), Ok(group), "{go}");
    }
    assert_eq!(
        web::curve("CurveP521").map(|g| g.name()),
        Err("curve_preferences: \"CurveP521\" is a Go curve that rustls (ring) does not implement; supported: CurveP256, CurveP384, X25519".into())
    );
    // The toolkit's own bad file's invented curve.
    assert_eq!(
        web::curve("CurveP257").map(|g| g.name()),
        Err("curve_preferences: \"CurveP257\" is not a curve name Go or rustls knows; supported: CurveP256, CurveP384, X25519".into())
    );
    let dir = with_certs("curves");
    // The toolkit's allCurves file, less its client_auth_type (no CA here): P-521 refused.
    assert_eq!(
        refused(
            &dir,
            "all.yml",
            &tls_yaml(
                "  curve_preferences:\n    - CurveP256\n    - CurveP384\n    - CurveP521\n    - X25519\n"
            )
        ),
        "curve_preferences: \"CurveP521\" is a Go curve that rustls (ring) does not implement; supported: CurveP256, CurveP384, X25519"
    );
}

/// The server's suites, groups and order, as the configuration sets them.
#[test]
fn suites_curves_and_order_applied() {
    let dir = with_certs("applied");
    let server = |extra: &str| {
        let c = load(&dir, "a.yml", &tls_yaml(extra)).unwrap();
        web::server_config(c.tls.as_ref().unwrap()).unwrap()
    };
    let suites = |s: &rustls::ServerConfig| -> Vec<CipherSuite> {
        s.crypto_provider()
            .cipher_suites
            .iter()
            .map(|c| c.suite())
            .collect()
    };
    let groups = |s: &rustls::ServerConfig| -> Vec<rustls::NamedGroup> {
        s.crypto_provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect()
    };
    let tls13_defaults = [
        CipherSuite::TLS13_AES_256_GCM_SHA384,
        CipherSuite::TLS13_AES_128_GCM_SHA256,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    ];

    // Nothing set: ring's defaults, the server's order (the toolkit's default).
    let s = server("");
    assert_eq!(
        suites(&s),
        rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|c| c.suite())
            .collect::<Vec<_>>()
    );
    assert!(s.ignore_client_order);
    assert!(!server("  prefer_server_cipher_suites: false\n").ignore_client_order);

    // TLS 1.2 names only (as a Go config has them): those, in that order; TLS 1.3 intact.
    let s = server(
        "  cipher_suites:\n    - TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256\n    - TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\n",
    );
    let mut want = tls13_defaults.to_vec();
    want.extend([
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ]);
    assert_eq!(suites(&s), want);

    // A TLS 1.3 name restricts TLS 1.3; TLS 1.2 keeps its defaults.
    let s = server("  cipher_suites:\n    - TLS_CHACHA20_POLY1305_SHA256\n");
    let mut want = vec![CipherSuite::TLS13_CHACHA20_POLY1305_SHA256];
    want.extend(
        rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|c| c.suite())
            .filter(|c| !tls13_defaults.contains(c)),
    );
    assert_eq!(suites(&s), want);

    let s = server("  curve_preferences:\n    - CurveP384\n    - X25519\n    - CurveP384\n");
    assert_eq!(
        groups(&s),
        [rustls::NamedGroup::secp384r1, rustls::NamedGroup::X25519]
    );
    assert_eq!(
        groups(&server("")),
        [
            rustls::NamedGroup::X25519,
            rustls::NamedGroup::secp256r1,
            rustls::NamedGroup::secp384r1
        ]
    );
}

/// The whole format at once: every key the toolkit documents that this agent takes.
#[test]
fn every_documented_key_together() {
    let dir = with_certs("all-keys");
    let c = load(
        &dir,
        "all.yml",
        &format!(
            "{}http_server_config:\n  http2: true\n  headers:\n    X-Content-Type-Options: nosniff\nbasic_auth_users:\n  prometheus: {HASH}\nrate_limit:\n  interval: 100ms\n  burst: 10\n",
            tls_yaml(
                "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: cert.pem\n  min_version: TLS12\n  max_version: TLS13\n  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]\n  prefer_server_cipher_suites: true\n  curve_preferences: [X25519]\n  client_allowed_sans: []\n"
            )
        ),
    )
    .unwrap();
    let tls = c.tls.as_ref().unwrap();
    assert_eq!(tls.client_ca, Some(Pem::File(dir.0.join("cert.pem"))));
    assert_eq!(
        tls.cipher_suites,
        ["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"]
    );
    assert_eq!(tls.curve_preferences, ["X25519"]);
    assert_eq!(
        c.rate_limit,
        Some(RateLimit {
            interval: Duration::from_millis(100),
            burst: 10
        })
    );
    assert_eq!(c.headers.len(), 1);
    assert_eq!(c.basic_auth_users.len(), 1);
}
