//! The browser of the browser tests (`tests/browser.rs`, `tests/console_browser.rs`):
//! Debian's chromedriver and a headless Chromium session with a fresh profile, started with
//! the flags this machine needs, gone when dropped. With `UPDATE_SCREENSHOTS=1` screenshots
//! go to `docs/screenshots/` (the README shows them).

#![allow(dead_code)] // each test binary uses a part

use std::path::PathBuf;
use std::time::Duration;

use marketplace_fulfillment::world::{free_local_address, wait_until};

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
        let port = free_local_address().unwrap().port();
        let chromedriver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver is installed (apt-get install chromium chromium-driver)");
        let up = || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
        };
        wait_until("chromedriver to listen", Duration::from_secs(20), up)
            .await
            .unwrap();
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
        let source = || async { self.driver.source().await.ok() };
        let shown = || async { source().await.filter(|page| page.contains(text)) };
        match wait_until(text, Duration::from_secs(30), shown).await {
            Ok(page) => page,
            Err(_) => panic!(
                "{text:?} never appeared; the page is:\n{:?}",
                source().await
            ),
        }
    }

    pub async fn screenshot(&self, name: &str) {
        self.driver
            .screenshot(&self.shots.join(format!("{name}.png")))
            .await
            .unwrap();
    }

    pub async fn heading(&self) -> String {
        let heading = self.driver.find(By::Tag("h1")).await.unwrap();
        heading.text().await.unwrap()
    }

    pub async fn quit(self) {
        self.driver.clone().quit().await.unwrap();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
