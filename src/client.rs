//! The CLI's side of the control API: finds a running daemon for a home and talks to it.
//!
//! A daemon announces itself in `daemon.json` (pid and the actual API address) next to
//! `config.toml`. If that file is missing, names a dead process, or nothing answers, the
//! CLI works on `config.toml` directly instead.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::{Config, Home};
use crate::error::{Error, Result};

/// Contents of `daemon.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    /// "127.0.0.1:PORT"
    pub api: String,
}

impl DaemonInfo {
    pub fn read(path: &Path) -> Option<DaemonInfo> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }
}

pub struct Client {
    base: String,
    key: String,
    agent: ureq::Agent,
}

/// What the API answers on error: `{"error": "..."}`.
#[derive(Debug, Deserialize)]
struct ApiError {
    error: String,
}

fn process_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

impl Client {
    /// A client for the daemon of `home`, if one is running and answers.
    pub fn connect(home: &Home, cfg: &Config) -> Option<Client> {
        let info = DaemonInfo::read(&home.daemon_path())?;
        if !process_alive(info.pid) {
            return None;
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let c = Client {
            base: format!("http://{}", info.api),
            key: cfg.api.key.clone(),
            agent,
        };
        c.get::<serde_json::Value>("/rest/ping").ok().map(|_| c)
    }

    fn finish<T: DeserializeOwned>(
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T> {
        let mut resp = resp.map_err(|e| Error::Net(format!("control API: {e}")))?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| Error::Net(format!("control API: {e}")))?;
        if !status.is_success() {
            let msg = serde_json::from_str::<ApiError>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            return Err(Error::Invalid(msg));
        }
        serde_json::from_str(&text).map_err(|e| Error::Net(format!("control API answer: {e}")))
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Self::finish(
            self.agent
                .get(format!("{}{}", self.base, path))
                .header("X-API-Key", &self.key)
                .call(),
        )
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &serde_json::Value) -> Result<T> {
        Self::finish(
            self.agent
                .post(format!("{}{}", self.base, path))
                .header("X-API-Key", &self.key)
                .send_json(body),
        )
    }

    pub fn patch<T: DeserializeOwned>(&self, path: &str, body: &serde_json::Value) -> Result<T> {
        Self::finish(
            self.agent
                .patch(format!("{}{}", self.base, path))
                .header("X-API-Key", &self.key)
                .send_json(body),
        )
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Self::finish(
            self.agent
                .delete(format!("{}{}", self.base, path))
                .header("X-API-Key", &self.key)
                .call(),
        )
    }
}
