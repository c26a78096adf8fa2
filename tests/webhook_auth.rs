//! Webhook bearer-token verification (docs/marketplace.md §6.6) against the simulator's Entra
//! on 127.0.0.1:0: accepted tokens, every kind of forgery, key rotation and JWKS outages.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::RSA_PKCS1_SHA256;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use marketplace_fulfillment::http::auth::{
    AuthError, MAX_TOKEN_BYTES, TokenVersion, WebhookAuthConfig, WebhookVerifier,
};
use marketplace_fulfillment::settings::MARKETPLACE_APP_ID;
use marketplace_fulfillment::simulator::{IssuerVersion, RunningSimulator};
use marketplace_fulfillment::world::SimHandle;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use url::Url;
use uuid::Uuid;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A verifier configured like production for the simulator's publisher identity.
fn verifier_for(
    sim: &RunningSimulator,
    jwks_url: Option<Url>,
    adjust: impl FnOnce(&mut WebhookAuthConfig),
) -> WebhookVerifier {
    let mut config = WebhookAuthConfig::from_settings(
        &common::simulator_settings(sim, &[]).marketplace,
        jwks_url,
    )
    .unwrap();
    adjust(&mut config);
    WebhookVerifier::new(config, reqwest::Client::new())
}

fn default_verifier(sim: &RunningSimulator) -> WebhookVerifier {
    verifier_for(sim, None, |_| {})
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn verify_token(
    verifier: &WebhookVerifier,
    token: &str,
) -> Result<marketplace_fulfillment::http::auth::VerifiedClaims, AuthError> {
    verifier.verify(Some(&bearer(token))).await
}

async fn rejection_reason(verifier: &WebhookVerifier, token: &str) -> &'static str {
    match verify_token(verifier, token).await {
        Ok(claims) => panic!("a forged token was accepted: {claims:?}"),
        Err(error) => error.reason(),
    }
}

fn mint(sim: &RunningSimulator, overrides: Value) -> String {
    sim.mint_webhook_token(overrides).unwrap()
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn b64_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

fn decode_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// The claims of a valid webhook token, to re-sign or re-encode.
fn valid_claims(sim: &RunningSimulator) -> Value {
    decode_part(&mint(sim, json!({})), 1)
}

fn current_kid(sim: &RunningSimulator) -> String {
    decode_part(&mint(sim, json!({})), 0)["kid"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// An RS256-shaped token whose header and claims are ours, signed with an RSA key the
/// simulator never published.
fn sign_with_foreign_key(header: &Value, claims: &Value) -> String {
    // One key for the whole run: RSA key generation is slow in debug builds.
    static FOREIGN_KEY: OnceLock<KeyPair> = OnceLock::new();
    let pair = FOREIGN_KEY.get_or_init(|| KeyPair::generate(KeySize::Rsa2048).unwrap());
    let message = format!("{}.{}", b64_json(header), b64_json(claims));
    let mut signature = vec![0; pair.public_modulus_len()];
    pair.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        message.as_bytes(),
        &mut signature,
    )
    .unwrap();
    format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
}

fn hs256(secret: &[u8], header: &Value, claims: &Value) -> String {
    let message = format!("{}.{}", b64_json(header), b64_json(claims));
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let tag = aws_lc_rs::hmac::sign(&key, message.as_bytes());
    format!("{message}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

fn der_length(len: usize) -> Vec<u8> {
    if len < 0x80 {
        return vec![len as u8];
    }
    let bytes: Vec<u8> = len
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    let mut out = vec![0x80 | bytes.len() as u8];
    out.extend(bytes);
    out
}

fn der_unsigned_integer(bytes: &[u8]) -> Vec<u8> {
    let mut value: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
    if value.first().is_none_or(|b| b & 0x80 != 0) {
        value.insert(0, 0);
    }
    let mut out = vec![0x02];
    out.extend(der_length(value.len()));
    out.extend(value);
    out
}

/// The published key of `kid` as the forms an attacker would use as an HMAC secret:
/// PKCS#1 DER, PEM, and the JWK JSON itself.
async fn public_key_forms(sim: &RunningSimulator, kid: &str) -> Vec<Vec<u8>> {
    let jwks: Value = reqwest::get(sim.jwks_url())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap()
        .clone();
    let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
    let e = URL_SAFE_NO_PAD.decode(jwk["e"].as_str().unwrap()).unwrap();
    let mut body = der_unsigned_integer(&n);
    body.extend(der_unsigned_integer(&e));
    let mut der = vec![0x30];
    der.extend(der_length(body.len()));
    der.extend(body);
    let encoded = STANDARD.encode(&der);
    let lines: Vec<&str> = encoded
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let pem = format!(
        "-----BEGIN RSA PUBLIC KEY-----\n{}\n-----END RSA PUBLIC KEY-----\n",
        lines.join("\n")
    );
    vec![der, pem.into_bytes(), serde_json::to_vec(&jwk).unwrap()]
}

// ---------------------------------------------------------------------------------------
// Accepted
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_v2_webhook_token_minted_by_the_simulator_is_accepted() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let token = mint(&sim, json!({}));

    let claims = verify_token(&verifier, &token).await.unwrap();

    assert_eq!(claims.tenant_id, sim.config().tenant_id);
    assert_eq!(claims.app_id.to_string(), MARKETPLACE_APP_ID);
    assert_eq!(claims.audience, sim.config().client_id.to_string());
    assert_eq!(claims.issuer, sim.v2_issuer());
    assert_eq!(claims.token_version, TokenVersion::V2);
    assert_eq!(
        claims.expires_at.unix_timestamp(),
        decode_part(&token, 1)["exp"].as_i64().unwrap()
    );
}

#[tokio::test]
async fn a_v1_webhook_token_with_appid_and_the_sts_issuer_is_accepted() {
    let sim = common::simulator(|c| c.issuer = IssuerVersion::V1).await;
    let verifier = default_verifier(&sim);
    let token = mint(&sim, json!({}));
    assert!(decode_part(&token, 1).get("azp").is_none());

    let claims = verify_token(&verifier, &token).await.unwrap();

    assert_eq!(claims.token_version, TokenVersion::V1);
    assert_eq!(
        claims.issuer,
        format!("https://sts.windows.net/{}/", sim.config().tenant_id)
    );
    assert_eq!(claims.app_id.to_string(), MARKETPLACE_APP_ID);
}

#[tokio::test]
async fn a_token_with_microsofts_own_v2_issuer_is_accepted() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let issuer = format!(
        "https://login.microsoftonline.com/{}/v2.0",
        sim.config().tenant_id
    );
    let token = mint(&sim, json!({ "iss": issuer }));

    let claims = verify_token(&verifier, &token).await.unwrap();

    assert_eq!(claims.issuer, issuer);
    assert_eq!(claims.token_version, TokenVersion::V2);
}

#[tokio::test]
async fn an_audience_in_app_id_uri_form_is_accepted() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let audience = format!("api://{}", sim.config().client_id);
    let token = mint(&sim, json!({ "aud": audience }));

    let claims = verify_token(&verifier, &token).await.unwrap();

    assert_eq!(claims.audience, audience);
}

#[tokio::test]
async fn a_token_expired_within_the_leeway_is_still_accepted() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let token = mint(&sim, json!({ "exp": now() - 20, "nbf": now() - 3600 }));

    assert!(verify_token(&verifier, &token).await.is_ok());
}

#[tokio::test]
async fn the_scheme_name_is_case_insensitive() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let token = mint(&sim, json!({}));

    let header = format!("bearer {token}");
    assert!(verifier.verify(Some(&header)).await.is_ok());
}

// ---------------------------------------------------------------------------------------
// Rejected: signature and key
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_token_with_a_tampered_payload_is_rejected_as_bad_signature() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let token = mint(&sim, json!({}));
    let mut claims = decode_part(&token, 1);
    claims["exp"] = json!(now() + 365 * 24 * 3600);
    let parts: Vec<&str> = token.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], b64_json(&claims), parts[2]);

    assert_eq!(
        rejection_reason(&verifier, &tampered).await,
        "bad_signature"
    );
}

#[tokio::test]
async fn a_token_signed_with_another_rsa_key_under_a_published_kid_is_rejected_as_bad_signature() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let header = json!({ "typ": "JWT", "alg": "RS256", "kid": current_kid(&sim) });
    let forged = sign_with_foreign_key(&header, &valid_claims(&sim));

    assert_eq!(rejection_reason(&verifier, &forged).await, "bad_signature");
}

#[tokio::test]
async fn a_token_signed_with_an_unpublished_key_is_rejected_as_unknown_kid() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let header = json!({ "typ": "JWT", "alg": "RS256", "kid": "not-a-published-kid" });
    let forged = sign_with_foreign_key(&header, &valid_claims(&sim));

    assert_eq!(rejection_reason(&verifier, &forged).await, "unknown_kid");
}

#[tokio::test]
async fn a_token_without_kid_is_rejected_as_malformed() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let header = json!({ "typ": "JWT", "alg": "RS256" });
    let forged = sign_with_foreign_key(&header, &valid_claims(&sim));

    assert_eq!(rejection_reason(&verifier, &forged).await, "malformed");
}

#[tokio::test]
async fn an_unsigned_token_with_alg_none_is_rejected_as_bad_algorithm() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let header = json!({ "typ": "JWT", "alg": "none", "kid": current_kid(&sim) });
    let claims = valid_claims(&sim);

    let unsigned = format!("{}.{}.", b64_json(&header), b64_json(&claims));

    assert_eq!(
        rejection_reason(&verifier, &unsigned).await,
        "bad_algorithm"
    );
}

#[tokio::test]
async fn an_hs256_token_keyed_with_the_published_public_key_is_rejected_as_bad_algorithm() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let kid = current_kid(&sim);
    let header = json!({ "typ": "JWT", "alg": "HS256", "kid": kid });
    let claims = valid_claims(&sim);

    for secret in public_key_forms(&sim, &kid).await {
        let forged = hs256(&secret, &header, &claims);
        assert_eq!(rejection_reason(&verifier, &forged).await, "bad_algorithm");
    }
}

#[tokio::test]
async fn a_token_announcing_another_rsa_algorithm_is_rejected_as_bad_algorithm() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let claims = valid_claims(&sim);

    for alg in ["RS384", "RS512", "PS256", "ES256", "rs256"] {
        let header = json!({ "typ": "JWT", "alg": alg, "kid": current_kid(&sim) });
        let forged = sign_with_foreign_key(&header, &claims);
        assert_eq!(
            rejection_reason(&verifier, &forged).await,
            "bad_algorithm",
            "alg {alg}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Rejected: claims (all well signed by the simulator)
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_expired_token_is_rejected_as_expired() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let token = mint(
        &sim,
        json!({ "iat": now() - 7200, "nbf": now() - 7200, "exp": now() - 3600 }),
    );

    assert_eq!(rejection_reason(&verifier, &token).await, "expired");
}

/// Verified tokens are remembered (Microsoft reuses one token for an hour of calls), but a
/// remembered token gets no longer life than its `exp`.
#[tokio::test]
async fn a_token_verified_before_is_refused_once_it_expires() {
    let sim = common::simulator(|_| {}).await;
    let verifier = verifier_for(&sim, None, |c| c.leeway = Duration::ZERO);
    let token = mint(&sim, json!({ "nbf": now() - 60, "exp": now() + 2 }));
    verify_token(&verifier, &token).await.unwrap();
    verify_token(&verifier, &token).await.unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let reason = loop {
        match verify_token(&verifier, &token).await {
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(claims) => panic!("an expired token is still accepted: {claims:?}"),
            Err(error) => break error.reason(),
        }
    };
    assert_eq!(reason, "expired");
}

#[tokio::test]
async fn a_token_not_valid_yet_is_rejected_as_not_yet_valid() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let token = mint(&sim, json!({ "nbf": now() + 3600, "exp": now() + 7200 }));

    assert_eq!(rejection_reason(&verifier, &token).await, "not_yet_valid");
}

#[tokio::test]
async fn a_token_without_exp_or_nbf_is_rejected_as_malformed() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);

    for missing in ["exp", "nbf"] {
        let mut overrides = serde_json::Map::new();
        overrides.insert(missing.to_owned(), Value::Null);
        let token = mint(&sim, Value::Object(overrides));
        assert_eq!(
            rejection_reason(&verifier, &token).await,
            "malformed",
            "without {missing}"
        );
    }
}

#[tokio::test]
async fn a_token_for_another_audience_is_rejected_as_wrong_audience() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);

    for aud in [
        json!(Uuid::new_v4().to_string()),
        json!(MARKETPLACE_APP_ID),
        json!([Uuid::new_v4().to_string()]),
        Value::Null,
    ] {
        let token = mint(&sim, json!({ "aud": aud }));
        assert_eq!(
            rejection_reason(&verifier, &token).await,
            "wrong_audience",
            "aud {aud}"
        );
    }
}

#[tokio::test]
async fn a_token_from_another_tenant_is_rejected_as_wrong_tenant() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);

    for tid in [json!(Uuid::new_v4()), json!("not-a-guid"), Value::Null] {
        let token = mint(&sim, json!({ "tid": tid }));
        assert_eq!(
            rejection_reason(&verifier, &token).await,
            "wrong_tenant",
            "tid {tid}"
        );
    }
}

#[tokio::test]
async fn a_v2_token_requested_by_another_app_is_rejected_as_wrong_app() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);

    for azp in [
        json!(Uuid::new_v4()),
        json!(sim.config().client_id),
        Value::Null,
    ] {
        let token = mint(&sim, json!({ "azp": azp }));
        assert_eq!(
            rejection_reason(&verifier, &token).await,
            "wrong_app",
            "azp {azp}"
        );
    }
    // A v2 token names its caller in `azp`; an `appid` alone does not count.
    let token = mint(&sim, json!({ "azp": null, "appid": MARKETPLACE_APP_ID }));
    assert_eq!(rejection_reason(&verifier, &token).await, "wrong_app");
}

#[tokio::test]
async fn a_v1_token_requested_by_another_app_is_rejected_as_wrong_app() {
    let sim = common::simulator(|c| c.issuer = IssuerVersion::V1).await;
    let verifier = default_verifier(&sim);

    for appid in [json!(Uuid::new_v4()), Value::Null] {
        let token = mint(&sim, json!({ "appid": appid }));
        assert_eq!(
            rejection_reason(&verifier, &token).await,
            "wrong_app",
            "appid {appid}"
        );
    }
}

#[tokio::test]
async fn a_token_from_another_issuer_is_rejected_as_wrong_issuer() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let other = Uuid::new_v4();

    for iss in [
        json!(format!("https://login.microsoftonline.com/{other}/v2.0")),
        json!(format!("https://sts.windows.net/{other}/")),
        json!("https://evil.example/"),
        json!(format!("{}/", sim.v2_issuer())),
        Value::Null,
    ] {
        let token = mint(&sim, json!({ "iss": iss }));
        assert_eq!(
            rejection_reason(&verifier, &token).await,
            "wrong_issuer",
            "iss {iss}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Rejected: the header itself
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_call_without_authorization_header_is_rejected_as_missing() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);

    assert_eq!(verifier.verify(None).await, Err(AuthError::Missing));
    assert_eq!(AuthError::Missing.reason(), "missing");
}

#[tokio::test]
async fn an_authorization_header_that_is_not_bearer_is_rejected_as_malformed() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let token = mint(&sim, json!({}));

    for header in [
        format!("Basic {token}"),
        token.clone(),
        format!("Bearer{token}"),
        "Bearer".to_string(),
        "Bearer   ".to_string(),
        String::new(),
    ] {
        let error = verifier.verify(Some(&header)).await.unwrap_err();
        assert_eq!(error.reason(), "malformed", "header {header:?}");
    }
}

#[tokio::test]
async fn a_garbage_token_is_rejected_as_malformed() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);

    for garbage in [
        "not-a-jwt",
        "a.b.c",
        "a.b.c.d",
        "....",
        "eyJhbGciOiJSUzI1NiJ9.e30.!!!",
        "e30.e30.e30",
    ] {
        assert_eq!(
            rejection_reason(&verifier, garbage).await,
            "malformed",
            "token {garbage}"
        );
    }
}

#[tokio::test]
async fn an_oversized_token_is_rejected_as_malformed_before_parsing() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let padding = "x".repeat(MAX_TOKEN_BYTES);
    let token = mint(&sim, json!({ "padding": padding }));
    assert!(token.len() > MAX_TOKEN_BYTES);

    assert_eq!(rejection_reason(&verifier, &token).await, "malformed");
}

#[tokio::test]
async fn rejections_never_echo_the_token() {
    let sim = common::simulator(|_| {}).await;
    let verifier = default_verifier(&sim);
    let token = mint(&sim, json!({ "aud": "someone-else" }));

    let error = verify_token(&verifier, &token).await.unwrap_err();

    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(&token));
    assert!(!shown.contains(token.split('.').nth(1).unwrap()));
}

// ---------------------------------------------------------------------------------------
// Key rotation and the JWKS cache
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn after_key_rotation_the_new_kid_is_fetched_once_and_a_second_unknown_kid_is_not_refetched()
{
    let sim = common::simulator(|_| {}).await;
    let interval = Duration::from_secs(1);
    let header = json!({ "typ": "JWT", "alg": "RS256", "kid": "never-published" });
    let forged = sign_with_foreign_key(&header, &valid_claims(&sim));
    let verifier = verifier_for(&sim, None, |c| {
        c.refresh_min_interval = interval;
    });
    let before = mint(&sim, json!({}));
    verify_token(&verifier, &before).await.unwrap();
    assert_eq!(sim.view().jwks_fetches(), 1);
    verify_token(&verifier, &before).await.unwrap();
    assert_eq!(
        sim.view().jwks_fetches(),
        1,
        "a known kid is served from the cache"
    );

    tokio::time::sleep(interval + Duration::from_millis(100)).await;
    let new_kid = sim.rotate_signing_key().unwrap();
    let after = mint(&sim, json!({}));
    assert_eq!(decode_part(&after, 0)["kid"], new_kid);

    let claims = verify_token(&verifier, &after).await.unwrap();
    assert_eq!(claims.tenant_id, sim.config().tenant_id);
    assert_eq!(
        sim.view().jwks_fetches(),
        2,
        "the unknown kid triggered one refetch"
    );

    // Our cache may be behind a rotation we may not refetch yet: ours, not the caller's
    // (503, so Microsoft redelivers; a 401 would reject a ChangePlan, §15.5).
    let error = verify_token(&verifier, &forged).await.unwrap_err();
    assert_eq!(error.reason(), "keys_not_refreshed");
    assert!(error.is_ours() && !error.is_unavailable());
    assert_eq!(
        sim.view().jwks_fetches(),
        2,
        "no second refetch inside the rate-limit interval"
    );

    verify_token(&verifier, &before).await.unwrap();
    verify_token(&verifier, &after).await.unwrap();
    assert_eq!(sim.view().jwks_fetches(), 2);
}

#[tokio::test]
async fn concurrent_first_calls_share_a_single_jwks_fetch() {
    let sim = common::simulator(|_| {}).await;
    let verifier = verifier_for(&sim, None, |_| {});
    let token = mint(&sim, json!({}));

    let calls = (0..16).map(|_| {
        let verifier = verifier.clone();
        let header = bearer(&token);
        tokio::spawn(async move { verifier.verify(Some(&header)).await })
    });
    for result in futures_util::future::join_all(calls).await {
        assert!(result.unwrap().is_ok());
    }

    assert_eq!(sim.view().jwks_fetches(), 1);
}

#[tokio::test]
async fn a_flood_of_unknown_kids_causes_at_most_one_fetch_per_interval() {
    let sim = common::simulator(|_| {}).await;
    let verifier = verifier_for(&sim, None, |_| {});
    let claims = valid_claims(&sim);
    verify_token(&verifier, &mint(&sim, json!({})))
        .await
        .unwrap();

    for n in 0..5 {
        let header = json!({ "typ": "JWT", "alg": "RS256", "kid": format!("forged-{n}") });
        let forged = sign_with_foreign_key(&header, &claims);
        // Refused without a fetch: the keys may not be refetched yet.
        assert_eq!(
            rejection_reason(&verifier, &forged).await,
            "keys_not_refreshed"
        );
    }

    assert_eq!(sim.view().jwks_fetches(), 1);
}

#[tokio::test]
async fn the_jwks_is_refetched_once_the_cache_ttl_has_passed() {
    let sim = common::simulator(|_| {}).await;
    let verifier = verifier_for(&sim, None, |c| {
        c.cache_ttl = Duration::from_millis(200);
        c.refresh_min_interval = Duration::from_millis(50);
    });
    let token = mint(&sim, json!({}));
    verify_token(&verifier, &token).await.unwrap();

    tokio::time::sleep(Duration::from_millis(300)).await;
    verify_token(&verifier, &token).await.unwrap();

    assert_eq!(sim.view().jwks_fetches(), 2);
}

#[tokio::test]
async fn when_the_jwks_goes_down_cached_keys_still_verify_and_unknown_kids_are_unavailable() {
    let sim = common::simulator(|_| {}).await;
    let verifier = verifier_for(&sim, None, |c| {
        c.refresh_min_interval = Duration::from_millis(50);
    });
    let token = mint(&sim, json!({}));
    verify_token(&verifier, &token).await.unwrap();

    let admin = SimHandle {
        http: reqwest::Client::new(),
        base: sim.base_url(),
    };
    admin.set_faults(json!({"jwks": "fail"})).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    verify_token(&verifier, &token).await.unwrap();

    sim.rotate_signing_key().unwrap();
    let rotated = mint(&sim, json!({}));
    let error = verify_token(&verifier, &rotated).await.unwrap_err();
    assert_eq!(error.reason(), "jwks_unavailable");
    assert!(error.is_unavailable());
    assert_eq!(sim.view().jwks_fetches(), 2);

    // The failed fetch did not evict the keys we had.
    verify_token(&verifier, &token).await.unwrap();
}

#[tokio::test]
async fn a_jwks_endpoint_answering_500_on_first_use_rejects_as_jwks_unavailable() {
    let sim = common::simulator(|_| {}).await;
    let jwks = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&jwks)
        .await;
    let url = Url::parse(&format!("{}/keys", jwks.uri())).unwrap();
    let verifier = verifier_for(&sim, Some(url), |_| {});
    let token = mint(&sim, json!({}));

    assert_eq!(
        rejection_reason(&verifier, &token).await,
        "jwks_unavailable"
    );
    assert_eq!(
        rejection_reason(&verifier, &token).await,
        "jwks_unavailable"
    );
    assert_eq!(
        jwks.received_requests().await.unwrap().len(),
        1,
        "failed fetches are rate-limited too"
    );
}

#[tokio::test]
async fn a_jwks_endpoint_on_a_closed_port_rejects_as_jwks_unavailable() {
    let sim = common::simulator(|_| {}).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let url = Url::parse(&format!("http://{address}/keys")).unwrap();
    let verifier = verifier_for(&sim, Some(url), |_| {});

    let token = mint(&sim, json!({}));
    assert_eq!(
        rejection_reason(&verifier, &token).await,
        "jwks_unavailable"
    );
}

#[tokio::test]
async fn a_jwks_endpoint_serving_no_usable_keys_rejects_as_jwks_unavailable() {
    let sim = common::simulator(|_| {}).await;
    let jwks = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>sign in</html>"))
        .mount(&jwks)
        .await;
    let url = Url::parse(&format!("{}/keys", jwks.uri())).unwrap();
    let html = verifier_for(&sim, Some(url.clone()), |_| {});
    let token = mint(&sim, json!({}));
    assert_eq!(rejection_reason(&html, &token).await, "jwks_unavailable");

    jwks.reset().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "keys": [
            { "kty": "oct", "kid": current_kid(&sim), "k": "c2VjcmV0" },
        ] })))
        .mount(&jwks)
        .await;
    let symmetric_only = verifier_for(&sim, Some(url), |_| {});
    assert_eq!(
        rejection_reason(&symmetric_only, &token).await,
        "jwks_unavailable"
    );
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_default_jwks_url_is_the_tenants_v2_discovery_keys_under_the_authority() {
    let sim = common::simulator(|_| {}).await;

    let config =
        WebhookAuthConfig::from_settings(&common::simulator_settings(&sim, &[]).marketplace, None)
            .unwrap();

    assert_eq!(config.jwks_url, sim.jwks_url());
    assert_eq!(config.tenant_id, sim.config().tenant_id);
    assert_eq!(config.leeway, Duration::from_secs(60));
    assert_eq!(config.refresh_min_interval, Duration::from_secs(30));
    assert_eq!(config.cache_ttl, Duration::from_secs(24 * 3600));
    assert!(
        config
            .audiences
            .contains(&sim.config().client_id.to_string())
    );
}

#[tokio::test]
async fn missing_publisher_identity_is_reported_by_variable_name() {
    let sim = common::simulator(|_| {}).await;

    let mut settings = common::simulator_settings(&sim, &[]).marketplace;
    settings.tenant_id = None;
    let error = WebhookAuthConfig::from_settings(&settings, None).unwrap_err();
    assert!(
        error.to_string().contains("MARKETPLACE_TENANT_ID"),
        "{error}"
    );

    let mut settings = common::simulator_settings(&sim, &[]).marketplace;
    settings.client_id = None;
    let error = WebhookAuthConfig::from_settings(&settings, None).unwrap_err();
    assert!(
        error.to_string().contains("MARKETPLACE_CLIENT_ID"),
        "{error}"
    );
}

#[tokio::test]
async fn a_configured_leeway_above_five_minutes_is_capped() {
    let sim = common::simulator(|_| {}).await;
    let verifier = verifier_for(&sim, None, |c| c.leeway = Duration::from_secs(3600));
    assert_eq!(verifier.config().leeway, Duration::from_secs(300));

    let token = mint(&sim, json!({ "nbf": now() - 3600, "exp": now() - 600 }));
    assert_eq!(rejection_reason(&verifier, &token).await, "expired");
}
