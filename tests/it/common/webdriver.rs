//! A headless Chromium driven over WebDriver: chromedriver on a free port,
//! spoken to in plain HTTP/1.1 with hyper. Installed by
//! `scripts/install-test-deps.sh` (Debian's `chromium` and
//! `chromium-driver`); `CHROMEDRIVER` and `CHROMIUM` override the paths.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// A browser session; the browser and its driver are stopped on drop.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

fn program(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a window of
    /// `width` × `height`.
    pub async fn start(width: u32, height: u32) -> Self {
        let port = super::free_port();
        let driver = Command::new(program("CHROMEDRIVER", "chromedriver"))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (run scripts/install-test-deps.sh)");
        let mut browser = Self {
            driver,
            port,
            session: String::new(),
        };
        for _ in 0..100 {
            if browser.call("GET", "/status", None).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": program("CHROMIUM", "/usr/bin/chromium"),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", format!("--window-size={width},{height}")]
            }
        }}});
        let created = browser
            .call("POST", "/session", Some(caps))
            .await
            .expect("new session");
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        browser
    }

    /// One WebDriver command; its `value`, or the error it answered.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("127.0.0.1:{}", self.port))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = send
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let ok = response.status().is_success();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if ok {
            Ok(v["value"].clone())
        } else {
            Err(v.to_string())
        }
    }

    fn at(&self, what: &str) -> String {
        format!("/session/{}/{what}", self.session)
    }

    /// Loads `url`.
    pub async fn goto(&self, url: &str) {
        self.call("POST", &self.at("url"), Some(json!({ "url": url })))
            .await
            .expect("navigate");
    }

    /// Runs `script` (a function body) in the page and returns its value.
    pub async fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            &self.at("execute/sync"),
            Some(json!({ "script": script, "args": [] })),
        )
        .await
        .expect("execute script")
    }

    /// Saves a PNG of the viewport to `path`.
    pub async fn screenshot(&self, path: &std::path::Path) {
        let b64 = self
            .call("GET", &self.at("screenshot"), None)
            .await
            .expect("screenshot");
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("base64 PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Ends the session, which closes the browser.
    pub async fn quit(mut self) {
        let session = std::mem::take(&mut self.session);
        let _ = self
            .call("DELETE", &format!("/session/{session}"), None)
            .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A test that panicked never reached `quit`: end the session here,
        // or killing the driver would leave the browser running, orphaned.
        if !self.session.is_empty() {
            use std::io::{Read as _, Write as _};
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = write!(
                    s,
                    "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                    self.session
                );
                let _ = s.read_to_end(&mut Vec::new());
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
