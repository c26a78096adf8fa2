//! The browser of the browser tests (`tests/browser.rs`, `tests/console_browser.rs`):
//! Debian's chromedriver and a headless Chromium session with a fresh profile, started with
//! the flags this machine needs, gone when dropped. With `UPDATE_SCREENSHOTS=1` screenshots
//! go to `docs/screenshots/` (the README shows them).

#![allow(dead_code)] // each test binary uses a part

use std::path::PathBuf;
use std::time::{Duration, Instant};

use thirtyfour::prelude::*;
use tokio::process::{Child, Command};
use uuid::Uuid;

/// chromedriver and a Chromium session with its own profile, both gone when dropped.
pub struct Browser {
    pub driver: WebDriver,
    _chromedriver: Child,
    profile: PathBuf,
    shots: PathBuf,
}

impl Browser {
    pub async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let chromedriver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver is installed (apt-get install chromium chromium-driver)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = std::env::temp_dir().join(format!("fulfillment-chromium-{}", Uuid::new_v4()));
        let mut caps = DesiredCapabilities::chrome();
        for arg in [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1000,860",
            &format!("--user-data-dir={}", profile.display()),
        ] {
            caps.add_arg(arg).unwrap();
        }
        let driver = WebDriver::new(format!("http://127.0.0.1:{port}"), caps)
            .await
            .expect("a Chromium session");
        let shots = if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots")
        } else {
            profile.join("screenshots")
        };
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            driver,
            _chromedriver: chromedriver,
            profile,
            shots,
        }
    }

    /// Waits until the page's source contains `text` (the landing page refreshes itself).
    pub async fn wait_for_text(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let source = self.driver.source().await.unwrap();
            if source.contains(text) {
                return source;
            }
            assert!(
                Instant::now() < deadline,
                "{text:?} never appeared; the page is:\n{source}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn screenshot(&self, name: &str) {
        self.driver
            .screenshot(&self.shots.join(format!("{name}.png")))
            .await
            .unwrap();
    }

    pub async fn heading(&self) -> String {
        self.driver
            .find(By::Tag("h1"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn quit(self) {
        self.driver.clone().quit().await.unwrap();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
