//! Issue #20: every credential form obtains a Fulfillment API token from the simulator's
//! Entra, each wrong one fails with Entra's code, and a certificate rotated on disk is used
//! without a restart. The token is then spent on List subscriptions, so the simulator's API
//! accepted it too.

mod common;
#[path = "common/event_schemas.rs"]
mod event_schemas;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use marketplace_fulfillment::marketplace::credential::generate_self_signed;
use marketplace_fulfillment::marketplace::token::failure_code;
use marketplace_fulfillment::marketplace::{CallContext, MarketplaceClient, TokenProvider};
use marketplace_fulfillment::settings::{CredentialKind, Settings};
use marketplace_fulfillment::simulator::{
    FEDERATED_AUDIENCE, FederatedCredential, RunningSimulator, SimulatorConfig,
};
use secrecy::SecretString;
use time::OffsetDateTime;
use uuid::Uuid;

const SUBJECT: &str = "system:serviceaccount:fulfillment:fulfillment";

struct Fixture {
    sim: RunningSimulator,
    dir: PathBuf,
}

impl Fixture {
    async fn start(configure: impl FnOnce(&mut SimulatorConfig)) -> Self {
        let sim = common::simulator(configure).await;
        let dir = std::env::temp_dir().join(format!("creds-test-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { sim, dir }
    }

    /// Settings of an engine pointed at the simulator, with `extra` variables.
    fn settings(&self, extra: &[(&str, String)]) -> Settings {
        common::simulator_settings(&self.sim, extra)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        // Write then rename, as a secret volume or cert-manager replaces a file.
        let temporary = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, &path).unwrap();
        path
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn certificate(valid_days: i64) -> (String, String) {
    let now = OffsetDateTime::now_utc();
    generate_self_signed(
        "fulfillment-test",
        now - time::Duration::days(2),
        now + time::Duration::days(valid_days),
    )
    .unwrap()
}

/// A token from `settings`, then List subscriptions with it.
async fn token_works(settings: &Settings) -> Result<(), String> {
    let tokens = TokenProvider::for_settings(settings).map_err(|e| e.to_string())?;
    tokens.token().await.map_err(|e| failure_code(&e))?;
    let client = MarketplaceClient::new(&settings.marketplace, tokens).unwrap();
    client
        .list_subscriptions_page(&CallContext::random(), None)
        .await
        .map(|_| ())
        .map_err(|e| format!("the API refused the token: {e}"))
}

async fn entra_code(settings: &Settings) -> String {
    let tokens = TokenProvider::for_settings(settings).unwrap();
    let error = tokens.token().await.expect_err("Entra must refuse");
    assert_eq!(error.kind(), "unauthorized", "{error}");
    failure_code(&error)
}

#[tokio::test]
async fn the_credential_follows_the_environment_like_the_azure_sdks() {
    let f = Fixture::start(|_| {}).await;
    let kind = |extra: &[(&str, String)]| {
        let settings = f.settings(extra);
        settings
            .credential
            .resolve(settings.marketplace.client_secret.is_some())
    };
    assert_eq!(
        kind(&[("MARKETPLACE_CLIENT_SECRET", "s".into())]),
        Some(CredentialKind::Secret)
    );
    assert_eq!(
        kind(&[("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token".into())]),
        Some(CredentialKind::WorkloadIdentity)
    );
    assert_eq!(
        kind(&[
            ("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi/token".into()),
            ("IDENTITY_HEADER", "h".into())
        ]),
        Some(CredentialKind::ManagedIdentity)
    );
    assert_eq!(
        kind(&[
            ("MARKETPLACE_CLIENT_SECRET", "s".into()),
            ("MARKETPLACE_CREDENTIAL", "managed_identity".into())
        ]),
        Some(CredentialKind::ManagedIdentity)
    );
    assert_eq!(kind(&[]), None);
    let error = TokenProvider::for_settings(&f.settings(&[]))
        .unwrap_err()
        .to_string();
    for variable in [
        "MARKETPLACE_CLIENT_SECRET",
        "MARKETPLACE_CLIENT_CERTIFICATE_PATH",
        "AZURE_FEDERATED_TOKEN_FILE",
        "IDENTITY_ENDPOINT",
        "MARKETPLACE_CREDENTIAL",
    ] {
        assert!(error.contains(variable), "{variable}: {error}");
    }
    let bad = Settings::from_sources(
        None,
        &HashMap::from([("MARKETPLACE_CREDENTIAL".to_owned(), "password".to_owned())]),
    )
    .unwrap_err()
    .to_string();
    assert!(bad.contains("MARKETPLACE_CREDENTIAL"), "{bad}");
}

#[tokio::test]
async fn a_client_secret_still_works() {
    let f = Fixture::start(|_| {}).await;
    token_works(&f.settings(&[("MARKETPLACE_CLIENT_SECRET", common::SIM_SECRET.into())]))
        .await
        .unwrap();
    let code = entra_code(&f.settings(&[("MARKETPLACE_CLIENT_SECRET", "wrong".into())])).await;
    assert_eq!(code, "AADSTS7000215");

    // Its health comes from MARKETPLACE_CLIENT_SECRET_EXPIRES_AT.
    let settings = f.settings(&[
        ("MARKETPLACE_CLIENT_SECRET", common::SIM_SECRET.into()),
        (
            "MARKETPLACE_CLIENT_SECRET_EXPIRES_AT",
            "2027-06-30T00:00:00Z".into(),
        ),
    ]);
    let status = TokenProvider::for_settings(&settings)
        .unwrap()
        .credential_status()
        .unwrap();
    assert_eq!(status.kind, CredentialKind::Secret);
    assert_eq!(
        status.expires_at,
        Some(time::macros::datetime!(2027-06-30 0:00 UTC))
    );
    let bad = Settings::from_sources(
        None,
        &HashMap::from([(
            "MARKETPLACE_CLIENT_SECRET_EXPIRES_AT".to_owned(),
            "next summer".to_owned(),
        )]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        bad.contains("MARKETPLACE_CLIENT_SECRET_EXPIRES_AT"),
        "{bad}"
    );
}

#[tokio::test]
async fn a_registered_certificate_obtains_a_token_and_wrong_ones_fail_with_entras_codes() {
    let (cert, key) = certificate(90);
    let registered = cert.clone();
    let f = Fixture::start(move |c| c.client_certificates.push(registered)).await;

    // One file with both, and the key in a file of its own; v2 and v1 endpoints.
    let both = f.write("both.pem", &format!("{cert}{key}"));
    let path = |p: &Path| p.display().to_string();
    token_works(&f.settings(&[("MARKETPLACE_CLIENT_CERTIFICATE_PATH", path(&both))]))
        .await
        .unwrap();
    let cert_file = f.write("cert.pem", &cert);
    let key_file = f.write("key.pem", &key);
    token_works(&f.settings(&[
        ("MARKETPLACE_CREDENTIAL", "certificate".into()),
        ("MARKETPLACE_CLIENT_CERTIFICATE_PATH", path(&cert_file)),
        ("MARKETPLACE_CLIENT_CERTIFICATE_KEY_PATH", path(&key_file)),
        ("MARKETPLACE_TOKEN_ENDPOINT", "v1".into()),
    ]))
    .await
    .unwrap();

    // The credential's health: the certificate's notAfter.
    let tokens = TokenProvider::for_settings(
        &f.settings(&[("MARKETPLACE_CLIENT_CERTIFICATE_PATH", path(&both))]),
    )
    .unwrap();
    let status = tokens.credential_status().unwrap();
    assert_eq!(status.kind, CredentialKind::Certificate);
    let days = (status.expires_at.unwrap() - OffsetDateTime::now_utc()).whole_days();
    assert!((89..=90).contains(&days), "{days}");

    // A certificate the app does not know.
    let (other_cert, other_key) = certificate(90);
    let other = f.write("other.pem", &format!("{other_cert}{other_key}"));
    let settings = f.settings(&[("MARKETPLACE_CLIENT_CERTIFICATE_PATH", path(&other))]);
    assert_eq!(entra_code(&settings).await, "AADSTS700027");

    // Registered, but expired.
    let (old_cert, old_key) = {
        let now = OffsetDateTime::now_utc();
        generate_self_signed(
            "expired",
            now - time::Duration::days(400),
            now - time::Duration::days(1),
        )
        .unwrap()
    };
    f.sim.register_client_certificate(&old_cert).unwrap();
    let expired = f.write("expired.pem", &format!("{old_cert}{old_key}"));
    let settings = f.settings(&[("MARKETPLACE_CLIENT_CERTIFICATE_PATH", path(&expired))]);
    let tokens = TokenProvider::for_settings(&settings).unwrap();
    let error = tokens.token().await.unwrap_err();
    assert_eq!(failure_code(&error), "AADSTS700027");
    assert!(error.to_string().contains("invalid_client"), "{error}");

    // Another app's id (the assertion's subject is not the client_id's app).
    let settings = f.settings(&[
        ("MARKETPLACE_CLIENT_CERTIFICATE_PATH", path(&both)),
        ("MARKETPLACE_CLIENT_ID", Uuid::new_v4().to_string()),
    ]);
    assert_eq!(entra_code(&settings).await, "AADSTS700016");

    // A file that is not a certificate is a configuration error naming the variable.
    let junk = f.write("junk.pem", "not a certificate");
    let error = TokenProvider::for_settings(
        &f.settings(&[("MARKETPLACE_CLIENT_CERTIFICATE_PATH", path(&junk))]),
    )
    .unwrap_err();
    assert_eq!(error.kind(), "configuration");
    assert!(error.to_string().contains("junk.pem"), "{error}");
}

/// Assertions the client would never send, posted by hand: wrong audience, expired, wrong
/// subject, bad signature.
#[tokio::test]
async fn forged_client_assertions_get_entras_codes() {
    let (cert, key) = certificate(90);
    let registered = cert.clone();
    let f = Fixture::start(move |c| c.client_certificates.push(registered)).await;
    let client_id = f.sim.config().client_id.to_string();
    let token_url = f.sim.token_url().to_string();
    let loaded = marketplace_fulfillment::marketplace::credential::parse_certificate(
        cert.as_bytes(),
        key.as_bytes(),
    )
    .unwrap();
    let sign = |claims: serde_json::Value| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::PS256);
        header.x5t_s256 = Some(loaded.thumbprint_s256.clone());
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_rsa_pem(key.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let claims = |aud: &str, sub: &str, exp: i64| {
        serde_json::json!({"aud": aud, "iss": client_id, "sub": sub, "jti": "x",
            "nbf": exp - 600, "iat": exp - 600, "exp": exp})
    };
    let http = reqwest::Client::new();
    let post = |assertion: String| {
        let http = http.clone();
        let url = token_url.clone();
        let client_id = client_id.clone();
        async move {
            let response = http
                .post(url)
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", &client_id),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", &assertion),
                    ("scope", "20e940b3-4c77-4b0b-9a53-9e16a1b010a7/.default"),
                ])
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap();
            (status, body)
        }
    };
    let (status, body) = post(sign(claims(&token_url, &client_id, now + 600))).await;
    assert_eq!(status, 200, "{body}");

    for (what, assertion, code) in [
        (
            "wrong audience",
            sign(claims("https://example.com/token", &client_id, now + 600)),
            50012,
        ),
        (
            "expired",
            sign(claims(&token_url, &client_id, now - 3600)),
            700024,
        ),
        (
            "wrong subject",
            sign(claims(&token_url, &Uuid::new_v4().to_string(), now + 600)),
            700021,
        ),
    ] {
        let (status, body) = post(assertion).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], "invalid_client", "{what}: {body}");
        assert_eq!(body["error_codes"][0], code, "{what}: {body}");
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .starts_with(&format!("AADSTS{code}: ")),
            "{what}: {body}"
        );
    }
    // Tampered payload: the signature no longer matches.
    let good = sign(claims(&token_url, &client_id, now + 600));
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    use base64::Engine;
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&claims(&token_url, &client_id, now + 900)).unwrap());
    let (status, body) = post(parts.join(".")).await;
    assert_eq!(
        (status, body["error_codes"][0].as_u64()),
        (401, Some(700027)),
        "{body}"
    );
}

#[tokio::test]
async fn a_certificate_rotated_on_disk_is_used_without_a_restart() {
    let (first_cert, first_key) = certificate(10);
    let (second_cert, second_key) = certificate(365);
    let registered = first_cert.clone();
    let f = Fixture::start(move |c| c.client_certificates.push(registered)).await;
    let file = f.write("client.pem", &format!("{first_cert}{first_key}"));
    let settings = f.settings(&[(
        "MARKETPLACE_CLIENT_CERTIFICATE_PATH",
        file.display().to_string(),
    )]);
    let tokens = TokenProvider::for_settings(&settings).unwrap();
    tokens.token().await.unwrap();
    let before = tokens.credential_status().unwrap().expires_at.unwrap();

    // The new certificate is uploaded to the app, the old one removed; the file replaced.
    let first_thumbprint = f.sim.register_client_certificate(&first_cert).unwrap();
    f.sim.register_client_certificate(&second_cert).unwrap();
    assert!(f.sim.remove_client_certificate(&first_thumbprint));
    f.write("client.pem", &format!("{second_cert}{second_key}"));

    // The same provider (no restart) signs its next refresh with the new certificate.
    tokens.invalidate().await;
    tokens.token().await.unwrap();
    let after = tokens.credential_status().unwrap().expires_at.unwrap();
    assert!(
        after - before > time::Duration::days(300),
        "{before} → {after}"
    );
    let client = MarketplaceClient::new(&settings.marketplace, tokens.clone()).unwrap();
    client
        .list_subscriptions_page(&CallContext::random(), None)
        .await
        .unwrap();

    // Had the file kept the removed certificate, Entra would refuse it.
    f.write("client.pem", &format!("{first_cert}{first_key}"));
    tokens.invalidate().await;
    let error = tokens.token().await.unwrap_err();
    assert_eq!(failure_code(&error), "AADSTS700027");
}

#[tokio::test]
async fn workload_identity_uses_the_federated_token_file_and_wrong_ones_fail() {
    let f = Fixture::start(|_| {}).await;
    let issuer = f.sim.federation_issuer();
    f.sim.register_federated_credential(FederatedCredential {
        issuer: issuer.clone(),
        subject: SUBJECT.into(),
        audience: FEDERATED_AUDIENCE.into(),
    });
    let config = f.sim.config().clone();
    let token_file = |token: String| f.write("azure-identity-token", &token);
    let mint = |subject: &str, audience: &str, lifetime: u64| {
        f.sim
            .mint_federated_token(subject, audience, Duration::from_secs(lifetime))
            .unwrap()
    };
    // As AKS sets them: AZURE_* only, no MARKETPLACE_TENANT_ID/CLIENT_ID needed.
    let settings = |file: &Path| {
        let mut env: HashMap<String, String> = [
            ("MARKETPLACE_API_URL", f.sim.api_url().to_string()),
            ("AZURE_AUTHORITY_HOST", f.sim.authority_url().to_string()),
            ("AZURE_TENANT_ID", config.tenant_id.to_string()),
            ("AZURE_CLIENT_ID", config.client_id.to_string()),
            ("AZURE_FEDERATED_TOKEN_FILE", file.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.insert("ENTRA_AUTHORITY_URL".into(), "http://127.0.0.1:9/".into());
        Settings::from_sources(None, &env).unwrap()
    };
    let file = token_file(mint(SUBJECT, FEDERATED_AUDIENCE, 3600));
    let good = settings(&file);
    assert_eq!(
        good.marketplace.client_id,
        Some(config.client_id),
        "AZURE_CLIENT_ID stands in for MARKETPLACE_CLIENT_ID"
    );
    token_works(&good).await.unwrap();

    // The file is read before each refresh: a wrong subject now fails, a good one again works.
    let tokens = TokenProvider::for_settings(&good).unwrap();
    tokens.token().await.unwrap();
    for (what, token, code) in [
        (
            "wrong subject",
            mint(
                "system:serviceaccount:other:other",
                FEDERATED_AUDIENCE,
                3600,
            ),
            "AADSTS70021",
        ),
        (
            "wrong audience",
            mint(SUBJECT, "api://SomethingElse", 3600),
            "AADSTS700212",
        ),
        (
            "expired",
            f.sim
                .sign_token(&serde_json::json!({
                    "iss": issuer, "sub": SUBJECT, "aud": FEDERATED_AUDIENCE,
                    "exp": OffsetDateTime::now_utc().unix_timestamp() - 3600,
                }))
                .unwrap(),
            "AADSTS700024",
        ),
    ] {
        token_file(token);
        tokens.invalidate().await;
        let error = tokens.token().await.expect_err(what);
        assert_eq!(failure_code(&error), code, "{what}: {error}");
    }
    // An issuer the app has no federated credential for.
    let foreign = f.sim.sign_token(&serde_json::json!({
        "iss": "https://token.actions.githubusercontent.com", "sub": SUBJECT,
        "aud": FEDERATED_AUDIENCE, "exp": OffsetDateTime::now_utc().unix_timestamp() + 600,
    }));
    token_file(foreign.unwrap());
    tokens.invalidate().await;
    assert_eq!(
        failure_code(&tokens.token().await.unwrap_err()),
        "AADSTS700211"
    );
    token_file(mint(SUBJECT, FEDERATED_AUDIENCE, 3600));
    tokens.invalidate().await;
    tokens.token().await.unwrap();
}

#[tokio::test]
async fn managed_identity_through_identity_endpoint_and_imds() {
    let f = Fixture::start(|c| c.identity_header = Some(SecretString::from("the-header"))).await;
    // App Service / Container Apps.
    let app_service = f.settings(&[
        ("IDENTITY_ENDPOINT", f.sim.identity_endpoint().to_string()),
        ("IDENTITY_HEADER", "the-header".into()),
    ]);
    token_works(&app_service).await.unwrap();
    let wrong = f.settings(&[
        ("IDENTITY_ENDPOINT", f.sim.identity_endpoint().to_string()),
        ("IDENTITY_HEADER", "another".into()),
    ]);
    assert_eq!(entra_code(&wrong).await, "invalid_request");

    // IMDS (a VM), here at the simulator instead of 169.254.169.254.
    let imds = f.settings(&[
        ("MARKETPLACE_CREDENTIAL", "managed_identity".into()),
        ("MARKETPLACE_IMDS_ENDPOINT", f.sim.base_url().to_string()),
    ]);
    token_works(&imds).await.unwrap();
    // A user-assigned identity the host does not have.
    let other = f.settings(&[
        ("MARKETPLACE_CREDENTIAL", "managed_identity".into()),
        ("MARKETPLACE_IMDS_ENDPOINT", f.sim.base_url().to_string()),
        ("AZURE_CLIENT_ID", Uuid::new_v4().to_string()),
    ]);
    assert_eq!(entra_code(&other).await, "invalid_request");
    let status = TokenProvider::for_settings(&imds)
        .unwrap()
        .credential_status()
        .unwrap();
    assert_eq!(status.kind, CredentialKind::ManagedIdentity);
    assert_eq!(status.expires_at, None);
}

/// `credential.expiring`: the gauge, and one CloudEvent per threshold however often the
/// worker looks (the notices are kept in PostgreSQL).
#[tokio::test]
async fn an_expiring_certificate_is_announced_once_per_threshold() {
    use marketplace_fulfillment::queue::Broker;
    use marketplace_fulfillment::worker::credential_health::{ROUTING_KEY, check_once};

    let (db, pool) = common::TestDatabase::migrated().await;
    let broker = Broker::connect(&db.settings.amqp, "credentials-test")
        .await
        .unwrap();
    let queue = format!("{}.test-credential-events", db.settings.amqp.prefix);
    broker
        .listen_to_domain_events(&queue, ROUTING_KEY)
        .await
        .unwrap();

    // A certificate with 5 days left, as the provider reports it.
    let f = Fixture::start(|_| {}).await;
    let (cert, key) = certificate(5);
    let file = f.write("client.pem", &format!("{cert}{key}"));
    let settings = f.settings(&[(
        "MARKETPLACE_CLIENT_CERTIFICATE_PATH",
        file.display().to_string(),
    )]);
    let status = TokenProvider::for_settings(&settings)
        .unwrap()
        .credential_status()
        .unwrap();
    let publisher = broker.publisher().await.unwrap();
    let now = OffsetDateTime::now_utc();
    let first = check_once(&pool, &publisher, &status, now).await.unwrap();
    assert_eq!(
        first.iter().map(|n| n.threshold_days).collect::<Vec<_>>(),
        vec![30, 7]
    );
    let again = check_once(&pool, &publisher, &status, now + time::Duration::hours(1))
        .await
        .unwrap();
    assert!(again.is_empty(), "announced twice: {again:?}");

    let taken = broker.take_all(&queue).await.unwrap().into_iter();
    let events: Vec<serde_json::Value> = taken
        .map(|message| serde_json::from_slice(&message.body).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    // As docs/events/credential.expiring.schema.json says.
    event_schemas::Contract::load().assert_valid(&events);
    for event in &events {
        assert_eq!(event["type"], "com.fulfillment.credential.expiring");
        assert_eq!(event["data"]["credential"], "certificate");
        assert!(event["data"]["daysLeft"].as_i64().unwrap() <= 5, "{event}");
    }
    broker.delete_queue(&queue).await.unwrap();
    broker.delete_topology().await.unwrap();
    pool.close().await;
}
