//! The web config kept current: the exporter-toolkit re-reads its web config file on every
//! request and its TLS settings (certificate included) on every new connection, so a new
//! password or a renewed certificate applies without a restart. Here every request and
//! every new connection compares the file's and its certificate, key and CA files'
//! (mtime, ctime, size, inode) with those last read (a few `stat`s) and re-reads only when
//! one changed. A file that no longer loads leaves the previous settings in force and is
//! logged once, until it changes again. TLS cannot be turned on or off this way: the
//! listener's scheme is fixed at start.

use std::{
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use log::{error, info};

use crate::config::{Origin, WebConfig, web::WebSecurity};

/// What a file looked like: None when it could not be stat'ed.
type Stamp = Vec<Option<(i64, i64, i64, i64, u64, u64)>>;

fn stamp_of(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f).ok().map(|m| {
                (
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                    m.size(),
                    m.ino(),
                )
            })
        })
        .collect()
}

struct Current {
    security: Arc<WebSecurity>,
    /// The web config file, then the files it names.
    files: Vec<PathBuf>,
    /// Their stamps when last read (or last found broken).
    stamp: Stamp,
}

/// The security settings in force, re-read from the web config file when it changes.
pub struct LiveWeb {
    file: Option<PathBuf>,
    current: Mutex<Arc<Current>>,
    /// One re-read at a time; the others use the settings in force meanwhile.
    reloading: tokio::sync::Mutex<()>,
}

impl LiveWeb {
    /// Fixed settings: nothing to re-read.
    pub fn fixed(security: WebSecurity) -> LiveWeb {
        LiveWeb::new(security, None)
    }

    /// `security`, built from `config`, which is re-read when its files change.
    pub fn watching(security: WebSecurity, config: &WebConfig) -> LiveWeb {
        LiveWeb::new(security, Some(config.files()))
    }

    fn new(security: WebSecurity, files: Option<Vec<PathBuf>>) -> LiveWeb {
        let file = files.as_ref().and_then(|f| f.first().cloned());
        let files = files.unwrap_or_default();
        let stamp = stamp_of(&files);
        LiveWeb {
            file,
            current: Mutex::new(Arc::new(Current {
                security: Arc::new(security),
                files,
                stamp,
            })),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    fn snapshot(&self) -> Arc<Current> {
        match self.current.lock() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, next: Current) {
        let next = Arc::new(next);
        match self.current.lock() {
            Ok(mut c) => *c = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    /// The settings in force; the file is re-read first if it (or a file it names) changed.
    pub async fn current(&self) -> Arc<WebSecurity> {
        let seen = self.snapshot();
        let Some(file) = &self.file else {
            return seen.security.clone();
        };
        let now = stamp_of(&seen.files);
        if now == seen.stamp {
            return seen.security.clone();
        }
        let _one = self.reloading.lock().await;
        let latest = self.snapshot();
        if !Arc::ptr_eq(&latest, &seen) {
            // Re-read by another request meanwhile.
            return latest.security.clone();
        }
        let (file, old) = (file.clone(), latest.security.clone());
        // Reading files and bcrypt (a new user list makes a new dummy hash) block.
        let loaded = tokio::task::spawn_blocking(move || {
            let cfg = WebConfig::load(&file, Origin::Flag).map_err(|e| e.to_string())?;
            if cfg.tls.is_some() != old.tls.is_some() {
                return Err(format!(
                    "--web.config.file: {}: TLS cannot be turned {} while the agent runs (the listener's scheme is fixed at start); restart the agent",
                    file.display(),
                    if cfg.tls.is_some() { "on" } else { "off" }
                ));
            }
            let security = WebSecurity::from_config_after(&cfg, &old)
                .map_err(|e| format!("--web.config.file: {}: {e}", file.display()))?;
            Ok((security, cfg.files()))
        })
        .await
        .unwrap_or_else(|e| Err(format!("re-reading --web.config.file failed: {e}")));
        match loaded {
            Ok((security, files)) => {
                info!("http: {} changed: re-read", self.file_name());
                // Stamped before the read if the same files: a change during it is seen.
                let stamp = if files == latest.files {
                    now
                } else {
                    stamp_of(&files)
                };
                let security = Arc::new(security);
                self.replace(Current {
                    security: security.clone(),
                    files,
                    stamp,
                });
                security
            }
            Err(e) => {
                error!("{e}; the previous settings stay in force");
                self.replace(Current {
                    security: latest.security.clone(),
                    files: latest.files.clone(),
                    stamp: now,
                });
                latest.security.clone()
            }
        }
    }

    fn file_name(&self) -> String {
        self.file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_default()
    }
}
