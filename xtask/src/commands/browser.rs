//! `cargo xtask browser-test`: the page in a real browser. Starts `supportlm serve` on the default model
//! and Chromium's WebDriver (`chromedriver`, headless Chromium; Debian's `chromium` and `chromium-driver`),
//! types a customer message, waits for the category bars and the streamed reply, checks no error is
//! shown, and saves screenshots at desktop and phone width under `runs/browser-test/`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};

/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A WebDriver session over HTTP.
struct Session {
    agent: ureq::Agent,
    base: String,
}

impl Session {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, body) => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or(json!({})).to_string()),
        }
        .with_context(|| format!("WebDriver {method} {path}"))?;
        let status = response.status().as_u16();
        let v: Value = response.into_body().read_json()?;
        if status != 200 {
            bail!("WebDriver {method} {path}: {status} {}", v["value"]);
        }
        Ok(v["value"].clone())
    }

    fn element(&self, css: &str) -> anyhow::Result<String> {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        v[ELEMENT]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no element {css}"))
    }

    fn text(&self, css: &str) -> anyhow::Result<String> {
        let id = self.element(css)?;
        Ok(self
            .call("GET", &format!("/element/{id}/text"), None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Polls `css`'s text until `done` holds, for at most `limit`.
    fn wait_text(
        &self,
        css: &str,
        limit: Duration,
        done: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let started = Instant::now();
        loop {
            let t = self.text(css)?;
            if done(&t) {
                return Ok(t);
            }
            if started.elapsed() > limit {
                bail!(
                    "{css} still reads {t:?} after {limit:?}; the page shows the error {:?}",
                    self.text("#error").unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn screenshot(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let b64 = self.call("GET", "/screenshot", None)?;
        let bytes = base64_decode(b64.as_str().unwrap_or_default())?;
        supportlm_data::fsio::write_atomic(path, &bytes)?;
        Ok(())
    }
}

/// Standard base64 (the screenshots WebDriver returns).
fn base64_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let digits: Vec<u32> = chunk
            .iter()
            .take_while(|&&c| c != b'=')
            .map(|&c| value(c).context("invalid base64"))
            .collect::<anyhow::Result<_>>()?;
        let n = digits.iter().fold(0u32, |acc, d| (acc << 6) | d) << (6 * (4 - digits.len()));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..digits.len().max(1)]);
    }
    Ok(out)
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

pub fn run() -> anyhow::Result<()> {
    let root = crate::utils::workspace_root();
    let out = root.join("runs").join("browser-test");
    std::fs::create_dir_all(&out)?;
    crate::commands::setup::run(&root)?;
    let (mut server, port) = crate::utils::start_serve(&[])?;
    let driver_port = crate::utils::free_port()?;
    let mut driver = crate::utils::die_with_parent(
        Command::new("chromedriver").arg(format!("--port={driver_port}")),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .context("starting chromedriver (install Debian's chromium and chromium-driver)")?;
    let result = drive(port, driver_port, &out);
    stop(&mut driver);
    stop(&mut server);
    result
}

fn drive(port: u16, driver_port: u16, out: &std::path::Path) -> anyhow::Result<()> {
    let base = format!("http://127.0.0.1:{driver_port}");
    crate::utils::wait_for(&format!("{base}/status"), Duration::from_secs(30))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let profile = tempfile::tempdir()?;
    let root = Session {
        agent: agent.clone(),
        base: base.clone(),
    };
    let session = root.call(
        "POST",
        "/session",
        Some(
            json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     format!("--user-data-dir={}", profile.path().display())]}}}}),
        ),
    )?;
    let id = session["sessionId"]
        .as_str()
        .context("WebDriver gave no session id")?
        .to_string();
    let s = Session {
        agent,
        base: format!("{base}/session/{id}"),
    };
    let result = (|| -> anyhow::Result<()> {
        s.call(
            "POST",
            "/window/rect",
            Some(json!({"width": 1280, "height": 1500})),
        )?;
        s.call(
            "POST",
            "/url",
            Some(json!({"url": format!("http://127.0.0.1:{port}/")})),
        )?;
        // The page has read /api/health when the model line names the model.
        s.wait_text("#model", Duration::from_secs(30), |t| {
            t.starts_with("Model ")
        })?;
        let message = "I was charged twice for my last order, can you refund one of the payments?";
        let input = s.element("#message")?;
        s.call(
            "POST",
            &format!("/element/{input}/value"),
            Some(json!({"text": message})),
        )?;
        let button = s.element("#go")?;
        s.call("POST", &format!("/element/{button}/click"), None)?;
        let label = s.wait_text("#label", Duration::from_secs(120), |t| !t.is_empty())?;
        let bars = s.text("#bars")?;
        ensure!(
            bars.lines().filter(|l| l.contains('%')).count() >= 11,
            "expected a bar per category, got {bars:?}"
        );
        let meta = s.wait_text("#rmeta", Duration::from_secs(300), |t| t.contains("tokens"))?;
        let reply = s.text("#reply")?;
        ensure!(
            !reply.trim().is_empty() && reply != "…",
            "no reply streamed in"
        );
        ensure!(
            s.text("#error")?.is_empty(),
            "the page shows an error: {}",
            s.text("#error")?
        );
        s.screenshot(&out.join("desktop.png"))?;
        s.call(
            "POST",
            "/window/rect",
            Some(json!({"width": 390, "height": 844})),
        )?;
        std::thread::sleep(Duration::from_millis(300));
        s.screenshot(&out.join("phone.png"))?;
        // The phone's second screen: the streamed reply.
        s.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": "document.getElementById('replycard').scrollIntoView();", "args": []})),
        )?;
        std::thread::sleep(Duration::from_millis(300));
        s.screenshot(&out.join("phone-reply.png"))?;
        println!("browser-test passed: {message:?} → {label}; reply ({meta}): {reply:?}");
        println!(
            "screenshots: desktop.png, phone.png and phone-reply.png in {}",
            out.display()
        );
        Ok(())
    })();
    let _ = s.call("DELETE", "", None);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_padded_and_unpadded_input() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("a$==").is_err());
    }
}
