//! The customer's browser, scripted: follows a landing-page link, signs in at the
//! simulator's Entra stand-in as a test user, and activates by posting the landing page's
//! form, as a person would (for the demo, the benchmarks and the system tests; the
//! browser tests do the same in Chromium). Cookies are kept for the landing page's host.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, bail, ensure};
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Method, StatusCode};
use url::Url;

/// One customer with their own cookies.
#[derive(Debug)]
pub struct ScriptedCustomer {
    http: reqwest::Client,
    /// The test user picked on the sign-in form (`customer`, see [`super::sign_in`]).
    user: String,
    cookies: Mutex<BTreeMap<String, String>>,
}

/// A page as the customer saw it.
#[derive(Debug, Clone)]
pub struct Page {
    pub status: StatusCode,
    pub url: Url,
    pub html: String,
}

impl ScriptedCustomer {
    pub fn new(user: &str) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(std::time::Duration::from_secs(15))
                .build()?,
            user: user.to_owned(),
            cookies: Mutex::new(BTreeMap::new()),
        })
    }

    /// Opens the landing link; when the page asks for sign-in, signs in and comes back.
    pub async fn open(&self, landing: &Url) -> anyhow::Result<Page> {
        let page = self.get_following(landing.clone()).await?;
        let Some(sign_in) = link_to(&page.html, "/auth/customer/sign-in?") else {
            return Ok(page);
        };
        let back = self.sign_in(&landing.join(&sign_in)?).await?;
        self.get_following(back).await
    }

    /// Opens the landing link, signs in, and posts the activation form with `answers`
    /// (`(field name, answer)`); returns the page after it.
    pub async fn activate(&self, landing: &Url, answers: &[(&str, &str)]) -> anyhow::Result<Page> {
        let page = self.open(landing).await?;
        ensure!(
            page.html.contains("id=\"activate-form\""),
            "the landing page shows no activation form (HTTP {}): {}",
            page.status,
            page_text(&page.html).join(" / ")
        );
        let csrf = input_value(&page.html, "csrf").context("no CSRF token in the form")?;
        let token = input_value(&page.html, "token").context("no token in the form")?;
        let mut form = vec![("csrf".to_string(), csrf), ("token".to_string(), token)];
        form.extend(
            answers
                .iter()
                .map(|(name, value)| (format!("field_{name}"), value.to_string())),
        );
        let target = page.url.join("/landing/activate")?;
        let response = self.send(Method::POST, target.clone(), Some(&form)).await?;
        let status = response.status();
        ensure!(
            status == StatusCode::SEE_OTHER,
            "activation answered {status}: {}",
            response.text().await.unwrap_or_default()
        );
        let next = location(&target, &response)?;
        self.get_following(next).await
    }

    /// Posts a form as this customer (their cookies), following no redirect.
    pub async fn post(&self, url: &Url, form: &[(String, String)]) -> anyhow::Result<Page> {
        let response = self.send(Method::POST, url.clone(), Some(form)).await?;
        Ok(Page {
            status: response.status(),
            url: url.clone(),
            html: response.text().await?,
        })
    }

    /// The value of one of this browser's cookies.
    pub fn cookie(&self, name: &str) -> Option<String> {
        let cookies = self.cookies.lock().unwrap_or_else(PoisonError::into_inner);
        cookies.get(name).cloned()
    }

    /// The sign-in round trip from `start` (`/auth/{surface}/sign-in?return=…`); returns
    /// where the app sends the browser back to.
    pub async fn sign_in(&self, start: &Url) -> anyhow::Result<Url> {
        let response = self.send(Method::GET, start.clone(), None).await?;
        ensure!(
            response.status().is_redirection(),
            "sign-in did not redirect to Entra: {}",
            response.status()
        );
        let authorize = location(start, &response)?;
        let form = self.send(Method::GET, authorize.clone(), None).await?;
        ensure!(
            form.status().is_success(),
            "the sign-in form answered {}: {}",
            form.status(),
            form.text().await.unwrap_or_default()
        );
        // The form posts the authorization request back with the chosen user.
        let mut fields: Vec<(String, String)> = authorize.query_pairs().into_owned().collect();
        fields.push(("user".into(), self.user.clone()));
        let mut action = authorize.clone();
        action.set_query(None);
        let picked = self
            .send(Method::POST, action.clone(), Some(&fields))
            .await?;
        ensure!(
            picked.status().is_redirection(),
            "the sign-in form refused {}: {}",
            self.user,
            picked.text().await.unwrap_or_default()
        );
        let callback = location(&action, &picked)?;
        let signed_in = self.send(Method::GET, callback.clone(), None).await?;
        if !signed_in.status().is_redirection() {
            bail!(
                "the sign-in callback answered {}: {}",
                signed_in.status(),
                page_text(&signed_in.text().await.unwrap_or_default()).join(" / ")
            );
        }
        location(&callback, &signed_in)
    }

    /// GET, following redirects on the same host (keeping cookies).
    async fn get_following(&self, mut url: Url) -> anyhow::Result<Page> {
        for _ in 0..5 {
            let response = self.send(Method::GET, url.clone(), None).await?;
            if response.status().is_redirection() {
                url = location(&url, &response)?;
                continue;
            }
            return Ok(Page {
                status: response.status(),
                url,
                html: response.text().await?,
            });
        }
        bail!("too many redirects from {url}")
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        form: Option<&[(String, String)]>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut request = self.http.request(method, url.clone());
        let cookie = self.cookie_header();
        if !cookie.is_empty() {
            request = request.header(COOKIE, cookie);
        }
        if let Some(form) = form {
            request = request.form(form);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach {}", url.path()))?;
        self.keep_cookies(&response);
        Ok(response)
    }

    fn cookie_header(&self) -> String {
        let cookies = self.cookies.lock().unwrap_or_else(PoisonError::into_inner);
        cookies
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep_cookies(&self, response: &reqwest::Response) {
        let mut cookies = self.cookies.lock().unwrap_or_else(PoisonError::into_inner);
        for header in response.headers().get_all(SET_COOKIE) {
            let Ok(header) = header.to_str() else {
                continue;
            };
            let pair = header.split(';').next().unwrap_or("");
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            let removed = value.is_empty()
                || header
                    .split(';')
                    .any(|a| a.trim().eq_ignore_ascii_case("max-age=0"));
            if removed {
                cookies.remove(name.trim());
            } else {
                cookies.insert(name.trim().to_owned(), value.trim().to_owned());
            }
        }
    }
}

fn location(base: &Url, response: &reqwest::Response) -> anyhow::Result<Url> {
    let value = response
        .headers()
        .get(LOCATION)
        .context("a redirect without Location")?
        .to_str()?;
    Ok(base.join(value)?)
}

/// Undoes askama's HTML escaping of attribute values.
fn unescape(value: &str) -> String {
    value
        .replace("&#38;", "&")
        .replace("&amp;", "&")
        .replace("&#34;", "\"")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#60;", "<")
        .replace("&#62;", ">")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
}

/// The first `href` that starts with `prefix`.
pub fn link_to(html: &str, prefix: &str) -> Option<String> {
    let start = html.find(&format!("href=\"{prefix}"))? + "href=\"".len();
    let end = start + html[start..].find('"')?;
    Some(unescape(&html[start..end]))
}

/// The value of the input named `name`.
pub fn input_value(html: &str, name: &str) -> Option<String> {
    let at = html.find(&format!("name=\"{name}\" value=\""))?;
    let start = at + format!("name=\"{name}\" value=\"").len();
    let end = start + html[start..].find('"')?;
    Some(unescape(&html[start..end]))
}

/// The visible text of a page, one line per heading, paragraph, row or definition.
pub fn page_text(html: &str) -> Vec<String> {
    let body = html
        .split_once("<body>")
        .map_or(html, |(_, body)| body)
        .replace("</th>", ": ")
        .replace("</dt>", ": ")
        .replace("</dd>", "\n")
        .replace("</h1>", "\n")
        .replace("</h2>", "\n")
        .replace("</tr>", "\n")
        .replace("</p>", "\n");
    let mut text = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    unescape(&text)
        .replace("&#x27;", "'")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}
