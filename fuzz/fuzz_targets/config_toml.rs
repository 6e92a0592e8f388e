//! The config loader: TOML text written to a file and loaded the way `wirescope run
//! --config FILE` loads it (`RunConfig::from_args_allowing_web_config`, which reads and
//! checks everything the file names). Nothing may panic; every refusal is a usage error
//! (exit 2) with a message; an accepted file is valid TOML and its values keep the
//! documented bounds; loading is deterministic.
#![no_main]

use std::{path::PathBuf, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use wirescope::{
    config::{EXIT_USAGE, RunConfig, cli::RunArgs},
    sources::wg::validate_ifname,
};

/// The file the input is written to, in a directory of this process's own.
fn config_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("wirescope-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the fuzz config directory");
        dir.join("wirescope.toml")
    })
}

fuzz_target!(|data: &[u8]| {
    // The loader opens the files a config names (wg-config, web.config.file); keep it away
    // from devices, FIFOs and pseudo-files that could block or never end, however spelled.
    let text = String::from_utf8_lossy(data);
    if ["/dev", "/proc", "/sys", "/run", "\\u", "\\U", "\\x"]
        .iter()
        .any(|s| text.contains(s))
    {
        return;
    }
    let path = config_path();
    std::fs::write(path, data).expect("writing the fuzz config file");
    let args = RunArgs {
        config: Some(path.clone()),
        ..Default::default()
    };
    let res = RunConfig::from_args_allowing_web_config(&args);
    match &res {
        Ok(cfg) => {
            let text = std::str::from_utf8(data).expect("an accepted config is UTF-8");
            text.parse::<toml::Table>()
                .expect("an accepted config is TOML");
            assert!(cfg.telemetry_path.starts_with('/'), "{cfg:?}");
            for name in cfg.tunnels.iter().chain(&cfg.underlays) {
                assert!(validate_ifname(name).is_ok(), "{name:?}");
            }
            for list in [&cfg.tunnels, &cfg.underlays] {
                for (i, n) in list.iter().enumerate() {
                    assert!(!list[..i].contains(n), "duplicate {n:?}");
                }
            }
            assert!((0.0..=100.0).contains(&cfg.failover.max_loss_percent));
            for d in [
                cfg.mullvad.interval,
                cfg.probes.interval,
                cfg.probes.timeout,
                cfg.failover.max_rtt,
                cfg.failover.max_handshake_age,
                cfg.failover.window,
                cfg.failover.cooldown,
                cfg.failover.timeout,
            ] {
                assert!(!d.is_zero(), "{cfg:?}");
            }
            for net in &cfg.leak_allow {
                assert_eq!(*net, net.trunc(), "host bits cleared");
            }
            // An obfuscation flow's remote end is a relay's: a real port, never local.
            for r in &cfg.obfuscation {
                let ip = r.remote.ip();
                assert!(r.remote.port() != 0 && !ip.is_loopback() && !ip.is_unspecified());
            }
        }
        Err(e) => {
            assert_eq!(e.exit_code(), EXIT_USAGE);
            assert!(!e.to_string().is_empty());
        }
    }
    // Deterministic: the same file loads the same way.
    match (res, RunConfig::from_args_allowing_web_config(&args)) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.listen_address, b.listen_address);
            assert_eq!(a.telemetry_path, b.telemetry_path);
            assert_eq!((&a.tunnels, &a.underlays), (&b.tunnels, &b.underlays));
            assert_eq!(a.leak_allow, b.leak_allow);
            assert_eq!(a.mullvad, b.mullvad);
            assert_eq!(a.probes, b.probes);
            assert_eq!(a.failover, b.failover);
            assert_eq!(a.state_dir, b.state_dir);
            assert_eq!(a.friendly_names, b.friendly_names);
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("{a:?} then {b:?}"),
    }
});
