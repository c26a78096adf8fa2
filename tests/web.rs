//! The web surfaces over plain HTTP (the browser tests are in `tests/browser.rs`): the
//! landing page activates nothing on GET or HEAD without sign-in, every page carries the
//! strict security headers, forms need the session's CSRF token, a callback needs its own
//! sign-in, and the console's sign-in gives roles by group and object id and refuses
//! everyone else.

mod stack;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use marketplace_fulfillment::http::{AppState, Application};
use marketplace_fulfillment::settings::{OperatorRule, SessionKey};
use marketplace_fulfillment::simulator::customer::{ScriptedCustomer, input_value};
use marketplace_fulfillment::simulator::sign_in::{OPERATORS_GROUP_ID, READER_OBJECT_ID};
use marketplace_fulfillment::web::auth::{
    CsrfToken, OperatorRole, Session, SignedInOperator, Surface, verify_csrf,
};
use stack::{Options, Purchase, Stack};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use url::Url;

#[tokio::test]
async fn head_and_get_without_sign_in_never_activate_nor_show_the_purchase() {
    let stack = Stack::start(Options::default()).await;
    let Purchase { id, landing, .. } = stack
        .admin
        .buy(serde_json::json!({"planId": "silver"}))
        .await
        .unwrap();
    let purchaser = stack.admin.view(id).await.unwrap()["subscription"]["purchaser"]["emailId"]
        .as_str()
        .unwrap()
        .to_owned();

    // `curl -I`, then a link-preview bot's GET, several times.
    for _ in 0..3 {
        let head = stack.http.head(landing.clone()).send().await.unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        let get = stack
            .http
            .get(landing.clone())
            .header(header::USER_AGENT, "Slackbot-LinkExpanding 1.0")
            .send()
            .await
            .unwrap();
        assert_eq!(get.status(), StatusCode::OK);
        let page = get.text().await.unwrap();
        assert!(page.contains("Sign in with Microsoft"), "{page}");
        assert!(
            !page.contains(&purchaser),
            "the purchaser's e-mail leaked: {page}"
        );
        assert!(!page.contains(&id.to_string()), "{page}");
    }
    // Time enough for a queued purchase to be recorded and activated (the simulator's
    // clocks are milliseconds): nothing was.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(
        stack.engine(id).await.unwrap().is_none(),
        "the purchase was recorded"
    );
    let status =
        stack.admin.view(id).await.unwrap()["subscription"]["saasSubscriptionStatus"].clone();
    assert_eq!(status, "PendingFulfillmentStart");
    stack.finish().await;
}

#[tokio::test]
async fn every_web_page_carries_the_strict_security_headers_and_no_script() {
    let stack = Stack::start(Options::default()).await;
    let Purchase { landing, .. } = stack
        .admin
        .buy(serde_json::json!({"planId": "silver"}))
        .await
        .unwrap();
    let response = stack.http.get(landing.clone()).send().await.unwrap();
    let headers = response.headers().clone();
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    for part in [
        "default-src 'none'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("script-src"),
        "{csp}"
    );
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(headers[header::REFERRER_POLICY], "no-referrer");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    // The signed-in page too: no script, no inline style anywhere.
    let customer = ScriptedCustomer::new("customer").unwrap();
    let page = customer.open(&landing).await.unwrap();
    for html in [response.text().await.unwrap(), page.html] {
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("style="), "{html}");
        assert!(!html.contains("<style"), "{html}");
        assert!(html.contains("<main"), "{html}");
    }
    let css = stack
        .http
        .get(landing.join("/assets/site.css").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(css.status(), StatusCode::OK);
    assert!(
        css.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
    stack.finish().await;
}

#[tokio::test]
async fn forms_without_the_sessions_csrf_token_or_from_another_site_are_refused() {
    let stack = Stack::start(Options::default()).await;
    let Purchase { id, landing, .. } = stack
        .admin
        .buy(serde_json::json!({"planId": "silver"}))
        .await
        .unwrap();
    let customer = ScriptedCustomer::new("customer").unwrap();
    let page = customer.open(&landing).await.unwrap();
    let token = input_value(&page.html, "token").unwrap();
    let activate = landing.join("/landing/activate").unwrap();
    let form = |csrf: &str| {
        vec![
            ("csrf".to_string(), csrf.to_string()),
            ("token".to_string(), token.clone()),
        ]
    };

    // Signed in, wrong or missing token: 403.
    for csrf in ["", "not-the-token"] {
        let refused = customer.post(&activate, &form(csrf)).await.unwrap();
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.html);
    }
    // Not signed in at all: 401.
    let anonymous = ScriptedCustomer::new("customer").unwrap();
    let refused = anonymous.post(&activate, &form("x")).await.unwrap();
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    // A cross-site POST carrying a valid session's cookie: refused before any handler.
    let csrf = input_value(&page.html, "csrf").unwrap();
    let session = customer.cookie("fulfillment_customer").unwrap();
    let cross = stack
        .http
        .post(activate.clone())
        .header(header::COOKIE, format!("fulfillment_customer={session}"))
        .header("sec-fetch-site", "cross-site")
        .header(header::ORIGIN, "https://evil.example")
        .form(&form(&csrf))
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), StatusCode::FORBIDDEN);

    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(
        stack.engine(id).await.unwrap().is_none(),
        "a refused form activated"
    );
    // The right token works.
    let accepted = customer.post(&activate, &form(&csrf)).await.unwrap();
    assert_eq!(accepted.status, StatusCode::SEE_OTHER, "{}", accepted.html);
    stack
        .wait_for("the purchase recorded", || async {
            stack.engine(id).await.unwrap()
        })
        .await;
    stack.finish().await;
}

#[tokio::test]
async fn console_sign_in_gives_roles_by_group_and_object_id_and_refuses_everyone_else() {
    let stack = Stack::start(Options::default()).await;
    let mut settings = stack.settings.clone();
    settings.http.listen_addr = "127.0.0.1:0".parse().unwrap();
    settings.web.session_key = Some(SessionKey::generate());
    settings.web.console_operators = vec![OperatorRule::Group(OPERATORS_GROUP_ID)];
    settings.web.console_read_only = vec![OperatorRule::ObjectId(READER_OBJECT_ID)];
    let application = Application::build(settings).await.unwrap();
    let base = Url::parse(&format!("http://{}/", application.local_addr())).unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(application.run_until_stopped(stop.clone()));
    let start = base
        .join("/auth/console/sign-in?return=%2Fconsole")
        .unwrap();

    for (user, role) in [("operator", "operator"), ("reader", "read_only")] {
        let browser = ScriptedCustomer::new(user).unwrap();
        let back = browser.sign_in(&start).await.unwrap();
        assert_eq!(back.path(), "/console");
        let cookie = browser.cookie("fulfillment_operator").expect("a session");
        assert!(cookie.contains(role), "{cookie}");
        assert!(browser.cookie("fulfillment_customer").is_none());
    }
    // Someone of the publisher's tenant on no list: signed in at Entra, refused by us.
    let browser = ScriptedCustomer::new("unlisted").unwrap();
    let refused = browser.sign_in(&start).await.unwrap_err().to_string();
    assert!(
        refused.contains("403") && refused.contains("not an operator"),
        "{refused}"
    );
    assert!(browser.cookie("fulfillment_operator").is_none());
    // Other tenants' users cannot even sign in at the publisher's tenant.
    for user in ["customer", "outsider"] {
        let browser = ScriptedCustomer::new(user).unwrap();
        let refused = browser.sign_in(&start).await.unwrap_err().to_string();
        assert!(refused.contains("not in this tenant"), "{refused}");
        assert!(browser.cookie("fulfillment_operator").is_none());
    }
    // Sign-in never returns to another site.
    let browser = ScriptedCustomer::new("operator").unwrap();
    let back = browser
        .sign_in(
            &base
                .join("/auth/console/sign-in?return=https%3A%2F%2Fevil.example%2F")
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(back.as_str(), base.join("/console").unwrap().as_str());
    stop.cancel();
    server.await.unwrap().unwrap();
    stack.finish().await;
}

/// The extractor the console's handlers take, on a probe route behind the same CSRF check.
#[tokio::test]
async fn the_operator_extractor_redirects_refuses_and_enforces_read_only() {
    let stack = Stack::start(Options::default()).await;
    let state = AppState::from_settings(&stack.settings).await.unwrap();
    async fn probe(operator: SignedInOperator) -> impl IntoResponse {
        format!("{} {}", operator.name, operator.role.as_str())
    }
    let app = axum::Router::new()
        .route("/console/probe", get(probe).post(probe))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            verify_csrf,
        ))
        .with_state(state.clone());
    let cookie_for = |role: OperatorRole, csrf: &CsrfToken| {
        let session = Session {
            surface: Surface::Console,
            object_id: "0b5e0000-0000-4000-8000-0000000000a2".into(),
            tenant_id: "t".into(),
            name: "Avery".into(),
            email: None,
            role: Some(role),
            csrf: csrf.clone(),
            expires_at: time::OffsetDateTime::now_utc().unix_timestamp() + 600,
        };
        session.cookie_header(&state.web.key)
    };
    let send = |method: &str, cookie: Option<String>, body: &str| {
        let mut request = Request::builder()
            .method(method)
            .uri("/console/probe")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(cookie) = cookie {
            request = request.header(header::COOKIE, cookie);
        }
        app.clone()
            .oneshot(request.body(Body::from(body.to_owned())).unwrap())
    };
    let csrf = CsrfToken::new_random();

    let anonymous = send("GET", None, "").await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        anonymous.headers()[header::LOCATION],
        "/auth/console/sign-in?return=%2Fconsole%2Fprobe"
    );
    assert_eq!(
        send("POST", None, "").await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let reader = cookie_for(OperatorRole::ReadOnly, &csrf);
    assert_eq!(
        send("GET", Some(reader.clone()), "")
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let body = format!("csrf={csrf}");
    assert_eq!(
        send("POST", Some(reader), &body).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let operator = cookie_for(OperatorRole::Operator, &csrf);
    assert_eq!(
        send("POST", Some(operator.clone()), "csrf=wrong")
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send("POST", Some(operator), &body).await.unwrap().status(),
        StatusCode::OK
    );
    // A customer's session is not an operator's.
    let customer = {
        let session = Session {
            surface: Surface::Customer,
            object_id: "c".into(),
            tenant_id: "t".into(),
            name: "Chris".into(),
            email: None,
            role: None,
            csrf: csrf.clone(),
            expires_at: time::OffsetDateTime::now_utc().unix_timestamp() + 600,
        };
        session.cookie_header(&state.web.key)
    };
    assert_eq!(
        send("GET", Some(customer), "").await.unwrap().status(),
        StatusCode::SEE_OTHER
    );
    stack.finish().await;
}

#[tokio::test]
async fn a_callback_without_its_sign_in_with_a_forged_state_or_a_replayed_code_starts_no_session() {
    let stack = Stack::start(Options::default()).await;
    let Purchase { landing, .. } = stack
        .admin
        .buy(serde_json::json!({"planId": "silver"}))
        .await
        .unwrap();
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let set_cookies = |response: &reqwest::Response| -> Vec<String> {
        response
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };

    // No sign-in in progress.
    let callback = landing.join("/auth/callback?code=abc&state=xyz").unwrap();
    let response = no_redirects.get(callback.clone()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(
        !set_cookies(&response)
            .iter()
            .any(|c| c.starts_with("fulfillment_customer="))
    );
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("This sign-in has expired")
    );

    // A sign-in in progress, but a state that is not its own.
    let start = no_redirects
        .get(landing.join("/auth/customer/sign-in?return=%2F").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(start.status(), StatusCode::SEE_OTHER);
    let pending = set_cookies(&start)
        .into_iter()
        .find(|c| c.starts_with("fulfillment_sign_in="))
        .expect("the pending sign-in cookie");
    assert!(
        pending.contains("HttpOnly") && pending.contains("Secure"),
        "{pending}"
    );
    assert!(pending.contains("SameSite=Lax"), "{pending}");
    let pending = pending.split(';').next().unwrap().to_owned();
    let forged = no_redirects
        .get(callback)
        .header(header::COOKIE, &pending)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::BAD_REQUEST);
    assert!(
        !set_cookies(&forged)
            .iter()
            .any(|c| c.starts_with("fulfillment_customer="))
    );

    stack.finish().await;
}
