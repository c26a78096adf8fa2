//! `GET /api/v1/openapi.json`: the OpenAPI 3.0 description of the entitlement API (and the
//! other routes of the ingress, for completeness). Hand-written; a system test checks that
//! it parses and names every route.

use axum::Json;
use serde_json::{Value, json};

/// Every path the document describes, in the order it lists them.
pub const PATHS: &[&str] = &[
    "/api/v1/subscriptions",
    "/api/v1/subscriptions/{id}",
    "/api/v1/subscriptions/{id}/activate",
    "/api/v1/subscriptions/{id}/change-plan",
    "/api/v1/subscriptions/{id}/change-quantity",
    "/api/v1/subscriptions/{id}/cancel",
    "/api/v1/commands/{id}",
    "/api/v1/usage",
    "/api/v1/webhook-endpoints",
    "/api/v1/webhook-endpoints/{id}",
    "/api/v1/webhook-endpoints/{id}/rotate-secret",
    "/api/v1/webhook-endpoints/{id}/test",
    "/api/v1/webhook-endpoints/{id}/deliveries",
    "/api/v1/webhook-endpoints/{id}/replay",
    "/api/v1/events",
    "/webhook",
    "/landing",
    "/landing/activate",
    "/auth/{surface}/sign-in",
    "/auth/callback",
    "/auth/{surface}/sign-out",
    "/assets/site.css",
    "/console",
    "/console/subscriptions",
    "/console/subscriptions/{id}",
    "/console/subscriptions/{id}/commands",
    "/console/dead-letters",
    "/console/dead-letters/{id}",
    "/console/dead-letters/{id}/replay",
    "/console/dead-letters/{id}/purge",
    "/console/effects",
    "/console/effects/{id}/retry",
    "/console/effects/{id}/abandon",
    "/console/journal",
    "/healthz",
    "/readyz",
    "/metrics",
];

/// `GET /api/v1/openapi.json`.
pub async fn openapi_json() -> Json<Value> {
    Json(document())
}

/// The whole document: the entitlement API, the ISV's webhook routes and the console's pages.
pub fn document() -> Value {
    let mut document = base_document();
    let (paths, schemas) = isv_part();
    for (path, item) in paths {
        document["paths"][path] = item;
    }
    for (name, schema) in schemas {
        document["components"]["schemas"][name] = schema;
    }
    if let Some(paths) = document["paths"].as_object_mut() {
        paths.extend(console_paths());
    }
    document
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

fn command(summary: &str, body: Option<Value>) -> Value {
    let mut operation = json!({
        "tags": ["commands"],
        "summary": summary,
        "security": [{ "apiKey": [] }],
        "parameters": [{ "$ref": "#/components/parameters/SubscriptionId" }],
        "responses": {
            "202": {
                "description": "Queued for the worker; GET /api/v1/commands/{commandId} tells its outcome.",
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/CommandAccepted" } } }
            },
            "400": error_response("Invalid subscription id or body."),
            "401": error_response("Missing or invalid API key, or no key configured."),
            "404": error_response("Unknown subscription."),
            "409": error_response("Refused at once, nothing queued: the machine refuses the command as the subscription stands (not Subscribed, a read-only CSP purchase, the same plan or seats, outside the policy's limits, an operation pending); `message` says why."),
            "503": error_response("The command could not be queued; retry after `Retry-After` seconds."),
        }
    });
    if let Some(schema) = body {
        operation["requestBody"] = json!({
            "required": true,
            "content": { "application/json": { "schema": schema } }
        });
    }
    json!({ "post": operation })
}

/// `POST /api/v1/usage` (docs/metering.md).
fn usage_path() -> Value {
    let event = json!({
        "type": "object",
        "required": ["subscriptionId", "dimension", "quantity", "effectiveAt", "idempotencyKey"],
        "properties": {
            "subscriptionId": { "type": "string", "format": "uuid" },
            "dimension": { "type": "string", "description": "One of the plan's metering dimensions (planComponents.meteringDimensions[].id)." },
            "quantity": { "type": "number", "exclusiveMinimum": true, "minimum": 0 },
            "effectiveAt": { "type": "string", "format": "date-time", "description": "When the usage happened; its clock hour must have started less than 24 h ago." },
            "idempotencyKey": { "type": "string", "maxLength": 200, "description": "Unique per usage: a repeat counts once." }
        }
    });
    json!({ "post": {
        "tags": ["metering"],
        "summary": "Report metered usage: one event, an array, or {\"events\": [...]} (at most 1000). All stored before the 200, or none.",
        "security": [{ "apiKey": [] }],
        "requestBody": { "required": true, "content": { "application/json": { "schema": { "oneOf": [
            event.clone(),
            { "type": "array", "items": event.clone(), "minItems": 1, "maxItems": 1000 },
            { "type": "object", "required": ["events"], "properties": { "events": { "type": "array", "items": event, "minItems": 1, "maxItems": 1000 } } }
        ] } } } },
        "responses": {
            "200": {
                "description": "Stored. Per event: `counted` (in its hour's total), `late` (its hour was already submitted: kept and reported, not billed), `repeat` (idempotency key seen before).",
                "content": { "application/json": { "schema": {
                    "type": "object",
                    "properties": {
                        "stored": { "type": "integer" }, "counted": { "type": "integer" },
                        "late": { "type": "integer" }, "repeats": { "type": "integer" },
                        "events": { "type": "array", "items": { "type": "object", "properties": {
                            "idempotencyKey": { "type": "string" },
                            "subscriptionId": { "type": "string", "format": "uuid" },
                            "dimension": { "type": "string" },
                            "hour": { "type": "string", "format": "date-time" },
                            "planId": { "type": "string" },
                            "status": { "type": "string", "enum": ["counted", "late", "repeat"] }
                        } } }
                    }
                } } }
            },
            "400": error_response("The body is not JSON or not a usage report."),
            "401": error_response("Missing or invalid API key, or no key configured."),
            "413": error_response("Body over 1 MiB."),
            "422": {
                "description": "Refused, nothing stored: `refused` lists each event's index, idempotencyKey and reason (unknown subscription, not Subscribed, a dimension not in the plan, outside the 24-hour window, quantity ≤ 0 …).",
                "content": { "application/json": { "schema": { "type": "object", "properties": {
                    "error": { "type": "string" }, "message": { "type": "string" },
                    "refused": { "type": "array", "items": { "type": "object", "properties": {
                        "index": { "type": "integer" }, "idempotencyKey": { "type": "string" }, "reason": { "type": "string" }
                    } } }
                } } } }
            },
            "503": error_response("Nothing stored: the database is unavailable, or the plan's dimensions cannot be learned from Microsoft yet; retry."),
        }
    } })
}

/// The document.
/// The operator console's pages (HTML, signed in as an operator; actions need the operator
/// role and the session's CSRF token, and confirm on a second page).
fn console_paths() -> serde_json::Map<String, Value> {
    let page = |summary: &str, parameters: Value| {
        json!({ "get": {
            "tags": ["console"], "summary": summary, "parameters": parameters,
            "responses": {
                "200": { "description": "HTML page.", "content": { "text/html": {} } },
                "303": { "description": "No session: to the console sign-in, and back." },
                "400": { "description": "HTML page: a malformed id, state, kind or cursor." }
            }
        }})
    };
    let action = |summary: &str, fields: Value| {
        let mut properties = json!({
            "csrf": { "type": "string" },
            "confirm": { "type": "string", "enum": ["yes"], "description": "Absent: a page that says what would happen and asks to confirm." }
        });
        if let (Some(all), Some(more)) = (properties.as_object_mut(), fields.as_object()) {
            all.extend(more.clone());
        }
        json!({ "post": {
            "tags": ["console"], "summary": summary,
            "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }],
            "requestBody": { "required": true, "content": { "application/x-www-form-urlencoded": { "schema": {
                "type": "object", "required": ["csrf"], "properties": properties
            } } } },
            "responses": {
                "200": { "description": "HTML page: the confirmation, or the outcome (journalled with the operator).", "content": { "text/html": {} } },
                "400": { "description": "HTML page: a malformed id or form." },
                "401": { "description": "No session." },
                "403": { "description": "Read-only operator, or a wrong CSRF token." },
                "404": { "description": "HTML page: nothing with that id." },
                "409": { "description": "HTML page: the effect is not dead any more." }
            }
        }})
    };
    let id =
        json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }]);
    let cursor = |name: &str| json!({ "name": name, "in": "query", "required": false, "schema": { "type": "string", "format": "uuid" } });
    let mut paths = serde_json::Map::new();
    for (path, value) in [
        (
            "/console",
            page(
                "Overview: subscriptions by state, webhook-to-ACK p50/p99 against 10 s, auto-accepted, dead letters, dead effects, outbox backlog, reconcile drift, what needs a person.",
                json!([]),
            ),
        ),
        (
            "/console/subscriptions",
            page(
                "Search (subscription id opens it; tenant id; offer id) and list by state, keyset pages.",
                json!([
                    { "name": "q", "in": "query", "required": false, "schema": { "type": "string" } },
                    { "name": "state", "in": "query", "required": false, "schema": { "type": "string", "enum": ["PendingFulfillment", "Subscribed", "Suspended", "Unsubscribed"] } },
                    cursor("after")
                ]),
            ),
        ),
        (
            "/console/subscriptions/{id}",
            page(
                "A subscription: state, plan, seats, term, tenants, pending and dead effects, the changes asked of Microsoft, the timeline with every call.",
                id.clone(),
            ),
        ),
        (
            "/console/subscriptions/{id}/commands",
            action(
                "A publisher command (activate, change_plan, change_quantity, cancel) through the queue and the machine.",
                json!({
                    "command": { "type": "string", "enum": ["activate", "change_plan", "change_quantity", "cancel"] },
                    "plan": { "type": "string" }, "quantity": { "type": "string" }
                }),
            ),
        ),
        (
            "/console/dead-letters",
            page("Dead letters waiting.", json!([])),
        ),
        (
            "/console/dead-letters/{id}",
            page("One dead letter whole (every copy).", id.clone()),
        ),
        (
            "/console/dead-letters/{id}/replay",
            action(
                "Replay a dead letter to its work queue (dry run, then confirmed).",
                json!({}),
            ),
        ),
        (
            "/console/dead-letters/{id}/purge",
            action(
                "Purge a dead letter, kept whole in the journal (dry run, then confirmed).",
                json!({}),
            ),
        ),
        (
            "/console/effects",
            page(
                "Dead effects, keyset pages.",
                json!([
                    cursor("subscription"),
                    { "name": "kind", "in": "query", "required": false, "schema": { "type": "string" } },
                    cursor("after")
                ]),
            ),
        ),
        (
            "/console/effects/{id}/retry",
            action(
                "Put a dead effect back to pending with a fresh attempt budget.",
                json!({}),
            ),
        ),
        (
            "/console/effects/{id}/abandon",
            action(
                "Give up on a dead effect for good.",
                json!({ "reason": { "type": "string", "maxLength": 500 } }),
            ),
        ),
        (
            "/console/journal",
            page(
                "The operators' journal, newest first.",
                json!([cursor("before")]),
            ),
        ),
    ] {
        paths.insert(path.to_string(), value);
    }
    paths
}

fn base_document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Marketplace fulfillment ingress",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Entitlement API of the publisher-side fulfillment engine for Microsoft commercial marketplace SaaS offers: read what a customer may use, and ask for changes. Every /api/v1 call needs `Authorization: Bearer <ENTITLEMENT_API_KEY>`."
        },
        "tags": [
            { "name": "subscriptions", "description": "Read entitlements." },
            { "name": "commands", "description": "Ask for changes (asynchronous)." },
            { "name": "metering", "description": "Report metered usage (billed hourly through Microsoft's Metering API)." },
            { "name": "webhooks", "description": "The ISV's signed webhook endpoints and the event feed (docs/webhooks.md)." },
            { "name": "marketplace", "description": "Called by Microsoft and customers." },
            { "name": "operations", "description": "Probes and metrics." }
        ],
        "paths": {
            "/api/v1/subscriptions": {
                "get": {
                    "tags": ["subscriptions"],
                    "summary": "List subscriptions (keyset pages in id order).",
                    "security": [{ "apiKey": [] }],
                    "parameters": [
                        { "name": "state", "in": "query", "schema": { "$ref": "#/components/schemas/State" } },
                        { "name": "beneficiaryTenantId", "in": "query", "schema": { "type": "string", "format": "uuid" } },
                        { "name": "offerId", "in": "query", "schema": { "type": "string" } },
                        { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 500, "default": 50 } },
                        { "name": "cursor", "in": "query", "description": "`nextCursor` of the previous page; omit it for the first page (an empty value is refused).", "schema": { "type": "string", "format": "uuid" } }
                    ],
                    "responses": {
                        "200": {
                            "description": "One page.",
                            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/SubscriptionPage" } } }
                        },
                        "400": error_response("Invalid filter, limit or cursor."),
                        "401": error_response("Missing or invalid API key, or no key configured.")
                    }
                }
            },
            "/api/v1/subscriptions/{id}": {
                "get": {
                    "tags": ["subscriptions"],
                    "summary": "One subscription's entitlement.",
                    "security": [{ "apiKey": [] }],
                    "parameters": [{ "$ref": "#/components/parameters/SubscriptionId" }],
                    "responses": {
                        "200": {
                            "description": "The subscription.",
                            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Subscription" } } }
                        },
                        "400": error_response("The id is not a GUID."),
                        "401": error_response("Missing or invalid API key, or no key configured."),
                        "404": error_response("Unknown subscription.")
                    }
                }
            },
            "/api/v1/subscriptions/{id}/activate": command("Activate a pending subscription (manual activation mode).", None),
            "/api/v1/subscriptions/{id}/change-plan": command(
                "Move the subscription to another plan.",
                Some(json!({
                    "type": "object", "required": ["planId"],
                    "properties": { "planId": { "type": "string", "minLength": 1, "maxLength": 256 } }
                }))
            ),
            "/api/v1/subscriptions/{id}/change-quantity": command(
                "Change the number of seats.",
                Some(json!({
                    "type": "object", "required": ["quantity"],
                    "properties": { "quantity": { "type": "integer", "minimum": 1, "maximum": 4294967295u64 } }
                }))
            ),
            "/api/v1/subscriptions/{id}/cancel": command("Cancel (unsubscribe) the subscription.", None),
            "/api/v1/commands/{id}": {
                "get": {
                    "tags": ["commands"],
                    "summary": "What became of a command: queued, requested (with Microsoft's operation id), succeeded, failed (with the reason) or unknown (an operator reconciles).",
                    "security": [{ "apiKey": [] }],
                    "parameters": [{
                        "name": "id", "in": "path", "required": true,
                        "description": "The commandId a command answered with.",
                        "schema": { "type": "string", "format": "uuid" }
                    }],
                    "responses": {
                        "200": {
                            "description": "The command's outcome.",
                            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/CommandOutcome" } } }
                        },
                        "400": error_response("The id is not a UUID."),
                        "401": error_response("Missing or wrong API key."),
                        "404": error_response("No such command was accepted here."),
                        "503": error_response("The database is unavailable; retry later.")
                    }
                }
            },
            "/api/v1/usage": usage_path(),
            "/webhook": {
                "post": {
                    "tags": ["marketplace"],
                    "summary": "Microsoft's connection webhook (Entra bearer JWT).",
                    "requestBody": {
                        "required": true,
                        "content": { "application/json": { "schema": {
                            "type": "object", "required": ["id", "subscriptionId", "action"],
                            "properties": {
                                "id": { "type": "string", "format": "uuid" },
                                "subscriptionId": { "type": "string", "format": "uuid" },
                                "action": { "type": "string" },
                                "activityId": { "type": "string", "format": "uuid" }
                            },
                            "additionalProperties": true
                        } } }
                    },
                    "responses": {
                        "200": { "description": "Queued (RabbitMQ confirmed)." },
                        "400": error_response("Malformed JSON or missing/invalid id, subscriptionId or action."),
                        "401": error_response("Missing or invalid bearer token; `reason` says which check failed."),
                        "413": error_response("Body over the configured limit."),
                        "503": error_response("Not queued; retry after `Retry-After` seconds.")
                    }
                }
            },
            "/landing": {
                "get": {
                    "tags": ["web"],
                    "summary": "Landing page (docs/web.md). Without a customer session: a sign-in page, nothing resolved, queued or shown (HEAD alike). Signed in: resolves the token and shows the purchase and its state; never activates a new purchase (unless LANDING_ACTIVATE_AFTER_SIGN_IN, on GET only).",
                    "parameters": [
                        { "name": "token", "in": "query", "required": true, "schema": { "type": "string" } },
                        { "name": "step", "in": "query", "required": false, "schema": { "type": "string", "enum": ["activating"] }, "description": "Set after the activation form: the page says \"all set\" once active." }
                    ],
                    "responses": {
                        "200": { "description": "HTML page: the sign-in, or the purchase.", "content": { "text/html": {} } },
                        "400": { "description": "HTML page: missing, invalid or expired token.", "content": { "text/html": {} } },
                        "503": { "description": "HTML page: retry in a minute.", "content": { "text/html": {} } }
                    }
                }
            },
            "/landing/activate": {
                "post": {
                    "tags": ["web"],
                    "summary": "The customer asks for activation: queues the resolved purchase with the onboarding answers.",
                    "requestBody": { "required": true, "content": { "application/x-www-form-urlencoded": { "schema": {
                        "type": "object", "required": ["csrf", "token"],
                        "properties": {
                            "csrf": { "type": "string", "description": "The session's CSRF token." },
                            "token": { "type": "string", "description": "The purchase token." }
                        },
                        "additionalProperties": { "type": "string", "description": "field_<name>: an onboarding answer (at most 200 characters)." }
                    } } } },
                    "responses": {
                        "303": { "description": "Queued; see /landing?token=…&step=activating." },
                        "401": { "description": "No customer session." },
                        "403": { "description": "Wrong CSRF token or a cross-site request." },
                        "422": { "description": "HTML page: an answer is too long.", "content": { "text/html": {} } },
                        "503": { "description": "HTML page: not queued, retry in a minute.", "content": { "text/html": {} } }
                    }
                }
            },
            "/auth/{surface}/sign-in": {
                "get": {
                    "tags": ["web"],
                    "summary": "Starts sign-in with Entra ID (code + PKCE): `customer` (any tenant) or `console` (the ISV's tenant).",
                    "parameters": [
                        { "name": "surface", "in": "path", "required": true, "schema": { "type": "string", "enum": ["customer", "console"] } },
                        { "name": "return", "in": "query", "required": false, "schema": { "type": "string" }, "description": "A path on this site to return to." }
                    ],
                    "responses": {
                        "303": { "description": "To Entra's authorize endpoint; sets the encrypted pending sign-in cookie." },
                        "503": { "description": "HTML page: sign-in not configured.", "content": { "text/html": {} } }
                    }
                }
            },
            "/auth/callback": {
                "get": {
                    "tags": ["web"],
                    "summary": "Entra's redirect back: redeems the code, checks the ID token, starts the session.",
                    "parameters": [
                        { "name": "code", "in": "query", "required": false, "schema": { "type": "string" } },
                        { "name": "state", "in": "query", "required": false, "schema": { "type": "string" } },
                        { "name": "error", "in": "query", "required": false, "schema": { "type": "string" } }
                    ],
                    "responses": {
                        "303": { "description": "Signed in; back to the page that asked." },
                        "400": { "description": "HTML page: expired or forged sign-in.", "content": { "text/html": {} } },
                        "403": { "description": "HTML page: signed in, but not an operator of the console.", "content": { "text/html": {} } },
                        "502": { "description": "HTML page: Entra's answer could not be confirmed.", "content": { "text/html": {} } }
                    }
                }
            },
            "/auth/{surface}/sign-out": {
                "post": {
                    "tags": ["web"],
                    "summary": "Ends the session of a surface.",
                    "parameters": [{ "name": "surface", "in": "path", "required": true, "schema": { "type": "string", "enum": ["customer", "console"] } }],
                    "requestBody": { "required": true, "content": { "application/x-www-form-urlencoded": { "schema": {
                        "type": "object", "required": ["csrf"], "properties": { "csrf": { "type": "string" } }
                    } } } },
                    "responses": {
                        "200": { "description": "HTML page: signed out.", "content": { "text/html": {} } },
                        "401": { "description": "No session." },
                        "403": { "description": "Wrong CSRF token." }
                    }
                }
            },
            "/assets/site.css": {
                "get": { "tags": ["web"], "summary": "The pages' stylesheet, with the brand colour.", "responses": { "200": { "description": "text/css" } } }
            },
            "/healthz": {
                "get": { "tags": ["operations"], "summary": "Liveness.", "responses": { "200": { "description": "`ok`" } } }
            },
            "/readyz": {
                "get": {
                    "tags": ["operations"], "summary": "Readiness: PostgreSQL and RabbitMQ usable.",
                    "responses": { "200": { "description": "Ready." }, "503": { "description": "Names the unavailable dependency." } }
                }
            },
            "/metrics": {
                "get": { "tags": ["operations"], "summary": "Prometheus metrics.", "responses": { "200": { "description": "Prometheus text format." } } }
            }
        },
        "components": {
            "securitySchemes": {
                "apiKey": { "type": "http", "scheme": "bearer", "description": "ENTITLEMENT_API_KEY (read-write) or a key of ENTITLEMENT_API_KEYS: a `read` key may only GET (anything else answers 403 `read_only_key`)." }
            },
            "parameters": {
                "SubscriptionId": {
                    "name": "id", "in": "path", "required": true,
                    "description": "The SaaS subscription id.",
                    "schema": { "type": "string", "format": "uuid" }
                }
            },
            "schemas": {
                "State": { "type": "string", "enum": ["PendingFulfillment", "Subscribed", "Suspended", "Unsubscribed"] },
                "Term": {
                    "type": "object",
                    "properties": {
                        "termUnit": { "type": "string", "nullable": true, "example": "P1M", "description": "As Microsoft sent it: P1M, P1Y … P5Y, PAY or another ISO-8601 duration such as P18M." },
                        "length": { "type": "object", "nullable": true, "description": "termUnit read as an ISO-8601 duration; null for PAY and other units that are none.", "properties": { "months": { "type": "integer" }, "days": { "type": "integer" } } },
                        "chargeDuration": { "type": "string", "nullable": true, "description": "How often a multi-year term is billed." },
                        "startDate": { "type": "string", "format": "date-time", "nullable": true },
                        "endDate": { "type": "string", "format": "date-time", "nullable": true }
                    }
                },
                "Party": {
                    "type": "object",
                    "properties": {
                        "tenantId": { "type": "string", "format": "uuid", "nullable": true },
                        "objectId": { "type": "string", "format": "uuid", "nullable": true },
                        "emailId": { "type": "string", "nullable": true, "description": "May be null (CSP and some private-offer purchases)." }
                    }
                },
                "Subscription": {
                    "type": "object",
                    "required": ["id", "state", "version", "createdAt", "updatedAt"],
                    "properties": {
                        "id": { "type": "string", "format": "uuid" },
                        "state": { "$ref": "#/components/schemas/State" },
                        "offerId": { "type": "string", "nullable": true },
                        "planId": { "type": "string", "nullable": true },
                        "quantity": { "type": "integer", "nullable": true },
                        "term": { "allOf": [{ "$ref": "#/components/schemas/Term" }], "nullable": true },
                        "beneficiaryTenantId": { "type": "string", "format": "uuid", "nullable": true },
                        "purchaserTenantId": { "type": "string", "format": "uuid", "nullable": true },
                        "beneficiary": { "allOf": [{ "$ref": "#/components/schemas/Party" }], "nullable": true },
                        "purchaser": { "allOf": [{ "$ref": "#/components/schemas/Party" }], "nullable": true, "description": "Differs from the beneficiary for CSP and multiparty private-offer purchases." },
                        "privateOfferId": { "type": "string", "nullable": true, "description": "sourceOffers[].externalId: the private offer the purchase came through." },
                        "allowedCustomerOperations": { "type": "array", "items": { "type": "string" }, "nullable": true, "description": "[\"Read\"] for CSP purchases: changes and cancellation are refused." },
                        "createdAt": { "type": "string", "format": "date-time" },
                        "updatedAt": { "type": "string", "format": "date-time" },
                        "version": { "type": "integer", "format": "int64", "description": "Bumped on every saved transition." }
                    }
                },
                "SubscriptionPage": {
                    "type": "object",
                    "required": ["subscriptions"],
                    "properties": {
                        "subscriptions": { "type": "array", "items": { "$ref": "#/components/schemas/Subscription" } },
                        "nextCursor": { "type": "string", "format": "uuid", "nullable": true }
                    }
                },
                "CommandAccepted": {
                    "type": "object",
                    "required": ["commandId"],
                    "properties": {
                        "commandId": { "type": "string", "format": "uuid" },
                        "subscriptionId": { "type": "string", "format": "uuid" },
                        "command": { "type": "string", "enum": ["activate", "change_plan", "change_quantity", "cancel"] },
                        "status": { "type": "string", "enum": ["queued"] }
                    }
                },
                "CommandOutcome": {
                    "type": "object",
                    "required": ["commandId", "subscriptionId", "command", "status", "requestedAt"],
                    "properties": {
                        "commandId": { "type": "string", "format": "uuid" },
                        "subscriptionId": { "type": "string", "format": "uuid" },
                        "command": { "type": "string", "enum": ["activate", "change_plan", "change_quantity", "cancel"] },
                        "status": { "type": "string", "enum": ["queued", "requested", "succeeded", "failed", "unknown"] },
                        "operationId": { "type": "string", "format": "uuid", "nullable": true },
                        "reason": { "type": "string", "nullable": true },
                        "requestedAt": { "type": "string", "format": "date-time" },
                        "decidedAt": { "type": "string", "format": "date-time", "nullable": true }
                    }
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": { "type": "string" },
                        "reason": { "type": "string" },
                        "message": { "type": "string" }
                    }
                }
            }
        }
    })
}

/// Named parts of the document (paths or schemas).
type Named = Vec<(&'static str, Value)>;

/// The paths and schemas of `/api/v1/webhook-endpoints…` and `/api/v1/events`
/// ([`super::isv`]).
fn isv_part() -> (Named, Named) {
    let endpoint_id = json!({
        "name": "id", "in": "path", "required": true,
        "description": "The endpoint id.",
        "schema": { "type": "string", "format": "uuid" }
    });
    let ok = |description: &str, schema: &str| {
        json!({
            "description": description,
            "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } }
        })
    };
    let body = |schema: &str| json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } });
    let unauthorized = error_response("Missing or invalid API key, or no key configured.");
    let unknown = error_response("No such endpoint.");
    let topics = json!({
        "type": "array", "minItems": 1,
        "items": { "type": "string", "example": "subscription.*" },
        "description": "`*`, `subscription.*` or routing keys of docs/events.md."
    });
    let paths = vec![
        (
            "/api/v1/webhook-endpoints",
            json!({
                "get": {
                    "tags": ["webhooks"], "summary": "Every endpoint (never a secret).",
                    "security": [{ "apiKey": [] }],
                    "responses": { "200": ok("The endpoints.", "EndpointList"), "401": unauthorized }
                },
                "post": {
                    "tags": ["webhooks"], "summary": "Register an endpoint; the answer holds its signing secret, shown this once.",
                    "security": [{ "apiKey": [] }],
                    "requestBody": body("NewEndpoint"),
                    "responses": {
                        "201": ok("Registered.", "EndpointWithSecret"),
                        "400": error_response("Not the expected JSON (unknown fields are refused)."),
                        "401": unauthorized,
                        "422": error_response("A value cannot be accepted: not https (nor loopback, nor `insecure`), an unknown topic, an empty offer id.")
                    }
                }
            }),
        ),
        (
            "/api/v1/webhook-endpoints/{id}",
            json!({
                "get": {
                    "tags": ["webhooks"], "summary": "One endpoint.", "security": [{ "apiKey": [] }],
                    "parameters": [endpoint_id],
                    "responses": { "200": ok("The endpoint.", "Endpoint"), "400": error_response("The id is not a UUID."), "401": unauthorized, "404": unknown }
                },
                "patch": {
                    "tags": ["webhooks"], "summary": "Change an endpoint; absent fields stay.", "security": [{ "apiKey": [] }],
                    "parameters": [endpoint_id],
                    "requestBody": body("EndpointChanges"),
                    "responses": { "200": ok("The endpoint.", "Endpoint"), "400": error_response("Not the expected JSON."), "401": unauthorized, "404": unknown, "422": error_response("A value cannot be accepted.") }
                },
                "delete": {
                    "tags": ["webhooks"], "summary": "Delete an endpoint; its pending deliveries are dropped.", "security": [{ "apiKey": [] }],
                    "parameters": [endpoint_id],
                    "responses": { "204": { "description": "Deleted." }, "401": unauthorized, "404": unknown }
                }
            }),
        ),
        (
            "/api/v1/webhook-endpoints/{id}/rotate-secret",
            json!({
                "post": {
                    "tags": ["webhooks"], "summary": "A new signing secret (shown once); the previous one keeps signing next to it until previousSecretValidUntil.",
                    "security": [{ "apiKey": [] }], "parameters": [endpoint_id],
                    "responses": { "200": ok("The endpoint and its new secret.", "EndpointWithSecret"), "401": unauthorized, "404": unknown }
                }
            }),
        ),
        (
            "/api/v1/webhook-endpoints/{id}/test",
            json!({
                "post": {
                    "tags": ["webhooks"], "summary": "Send a signed `webhook.test` event now and report the answer.",
                    "security": [{ "apiKey": [] }], "parameters": [endpoint_id],
                    "responses": { "200": ok("What the endpoint answered.", "TestResult"), "401": unauthorized, "404": unknown }
                }
            }),
        ),
        (
            "/api/v1/webhook-endpoints/{id}/deliveries",
            json!({
                "get": {
                    "tags": ["webhooks"], "summary": "The delivery log: every attempt, newest first.",
                    "security": [{ "apiKey": [] }],
                    "parameters": [
                        endpoint_id,
                        { "name": "before", "in": "query", "schema": { "type": "integer", "format": "int64", "minimum": 1 }, "description": "The nextBefore of a previous page." },
                        { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 100 } }
                    ],
                    "responses": { "200": ok("Attempts.", "AttemptPage"), "400": error_response("Invalid before or limit."), "401": unauthorized, "404": unknown }
                }
            }),
        ),
        (
            "/api/v1/webhook-endpoints/{id}/replay",
            json!({
                "post": {
                    "tags": ["webhooks"], "summary": "Send deliveries again: one event, the endpoint's failures, or everything since a time. A dry run unless dryRun is false; journalled.",
                    "security": [{ "apiKey": [] }], "parameters": [endpoint_id],
                    "requestBody": body("ReplayRequest"),
                    "responses": { "200": ok("What was (or would be) sent again.", "ReplayResult"), "400": error_response("Not exactly one of eventId, failures, since; or a malformed since."), "401": unauthorized, "404": unknown }
                }
            }),
        ),
        (
            "/api/v1/events",
            json!({
                "get": {
                    "tags": ["webhooks"], "summary": "The pull feed: the webhooks' CloudEvents (same ids) in the order they were published.",
                    "security": [{ "apiKey": [] }],
                    "parameters": [
                        { "name": "after", "in": "query", "schema": { "type": "string", "pattern": "^[0-9]+$" }, "description": "The nextCursor of a previous answer; omit it to start at the beginning (an empty value is refused)." },
                        { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 100 } },
                        { "name": "type", "in": "query", "schema": { "type": "string" }, "description": "subscription.activated or com.fulfillment.subscription.activated." },
                        { "name": "subscriptionId", "in": "query", "schema": { "type": "string", "format": "uuid" } }
                    ],
                    "responses": { "200": ok("Events and the next cursor.", "EventPage"), "400": error_response("Invalid after, limit, type or subscriptionId."), "401": unauthorized }
                }
            }),
        ),
    ];
    let endpoint_properties = json!({
        "id": { "type": "string", "format": "uuid" },
        "url": { "type": "string", "format": "uri" },
        "description": { "type": "string" },
        "topics": { "type": "array", "items": { "type": "string" } },
        "offerId": { "type": "string", "nullable": true },
        "insecure": { "type": "boolean" },
        "status": { "type": "string", "enum": ["enabled", "disabled"] },
        "disabledReason": { "type": "string", "nullable": true },
        "failingSince": { "type": "string", "format": "date-time", "nullable": true },
        "previousSecretValidUntil": { "type": "string", "format": "date-time", "nullable": true },
        "createdAt": { "type": "string", "format": "date-time" },
        "updatedAt": { "type": "string", "format": "date-time" }
    });
    let mut with_secret = endpoint_properties.clone();
    with_secret["secret"] =
        json!({ "type": "string", "pattern": "^whsec_", "description": "Shown this once." });
    let schemas = vec![
        (
            "Endpoint",
            json!({ "type": "object", "required": ["id", "url", "topics", "status"], "properties": endpoint_properties }),
        ),
        (
            "EndpointWithSecret",
            json!({ "type": "object", "required": ["id", "url", "topics", "status", "secret"], "properties": with_secret }),
        ),
        (
            "EndpointList",
            json!({ "type": "object", "required": ["endpoints"], "properties": { "endpoints": { "type": "array", "items": { "$ref": "#/components/schemas/Endpoint" } } } }),
        ),
        (
            "NewEndpoint",
            json!({
                "type": "object", "required": ["url"], "additionalProperties": false,
                "properties": {
                    "url": { "type": "string", "description": "https://…; plain http:// only on a loopback host or with insecure." },
                    "topics": topics.clone(),
                    "offerId": { "type": "string", "minLength": 1, "maxLength": 256 },
                    "description": { "type": "string", "maxLength": 1024 },
                    "insecure": { "type": "boolean", "default": false }
                }
            }),
        ),
        (
            "EndpointChanges",
            json!({
                "type": "object", "additionalProperties": false,
                "properties": {
                    "url": { "type": "string" },
                    "topics": topics,
                    "offerId": { "type": "string", "minLength": 1, "maxLength": 256, "nullable": true, "description": "null: every offer." },
                    "description": { "type": "string", "maxLength": 1024 },
                    "insecure": { "type": "boolean" },
                    "enabled": { "type": "boolean" }
                }
            }),
        ),
        (
            "TestResult",
            json!({
                "type": "object", "required": ["eventId", "delivered"],
                "properties": {
                    "eventId": { "type": "string" },
                    "delivered": { "type": "boolean" },
                    "status": { "type": "integer", "nullable": true },
                    "latencyMs": { "type": "integer" },
                    "response": { "type": "string", "description": "The first 1 KiB of the answer, or the transport error." },
                    "answer": { "type": "string" }
                }
            }),
        ),
        (
            "Attempt",
            json!({
                "type": "object",
                "properties": {
                    "id": { "type": "integer", "format": "int64" },
                    "eventId": { "type": "string" },
                    "attemptedAt": { "type": "string", "format": "date-time" },
                    "status": { "type": "integer", "nullable": true, "description": "null: no answer (timeout, no connection)." },
                    "latencyMs": { "type": "integer" },
                    "response": { "type": "string" },
                    "outcome": { "type": "string", "enum": ["delivered", "failed", "skipped"] }
                }
            }),
        ),
        (
            "AttemptPage",
            json!({
                "type": "object", "required": ["deliveries"],
                "properties": {
                    "deliveries": { "type": "array", "items": { "$ref": "#/components/schemas/Attempt" } },
                    "nextBefore": { "type": "string", "nullable": true }
                }
            }),
        ),
        (
            "ReplayRequest",
            json!({
                "type": "object", "additionalProperties": false,
                "description": "Exactly one of eventId, failures (true) and since.",
                "properties": {
                    "eventId": { "type": "string" },
                    "failures": { "type": "boolean" },
                    "since": { "type": "string", "format": "date-time" },
                    "dryRun": { "type": "boolean", "default": true }
                }
            }),
        ),
        (
            "ReplayResult",
            json!({
                "type": "object", "required": ["dryRun", "replayed", "deliveries"],
                "properties": {
                    "dryRun": { "type": "boolean" },
                    "replayed": { "type": "integer" },
                    "deliveries": { "type": "array", "items": { "type": "object", "properties": {
                        "outboxId": { "type": "string", "format": "uuid" },
                        "endpointId": { "type": "string", "format": "uuid" },
                        "eventId": { "type": "string" },
                        "status": { "type": "string", "enum": ["done", "dead"] },
                        "queuedAt": { "type": "string", "format": "date-time" }
                    } } }
                }
            }),
        ),
        (
            "EventPage",
            json!({
                "type": "object", "required": ["events", "nextCursor"],
                "properties": {
                    "events": { "type": "array", "items": { "type": "object", "description": "A CloudEvent (docs/events.md)." } },
                    "nextCursor": { "type": "string", "pattern": "^[0-9]+$" }
                }
            }),
        ),
    ];
    (paths, schemas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_every_path() {
        let document = document();
        let paths = document["paths"].as_object().unwrap();
        for path in PATHS {
            assert!(paths.contains_key(*path), "{path} missing");
        }
        assert_eq!(paths.len(), PATHS.len());
    }
}
