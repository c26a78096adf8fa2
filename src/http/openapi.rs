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
    "/webhook",
    "/landing",
    "/healthz",
    "/readyz",
    "/metrics",
];

/// `GET /api/v1/openapi.json`.
pub async fn openapi_json() -> Json<Value> {
    Json(document())
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

/// The document.
pub fn document() -> Value {
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
                        { "name": "cursor", "in": "query", "description": "`nextCursor` of the previous page.", "schema": { "type": "string", "format": "uuid" } }
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
                    "properties": { "quantity": { "type": "integer", "minimum": 1 } }
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
                    "tags": ["marketplace"],
                    "summary": "Landing page: resolves the purchase token and shows the purchase.",
                    "parameters": [{ "name": "token", "in": "query", "required": true, "schema": { "type": "string" } }],
                    "responses": {
                        "200": { "description": "HTML page describing the purchase.", "content": { "text/html": {} } },
                        "400": { "description": "HTML page: missing, invalid or expired token.", "content": { "text/html": {} } },
                        "503": { "description": "HTML page: retry in a minute.", "content": { "text/html": {} } }
                    }
                }
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
                "apiKey": { "type": "http", "scheme": "bearer", "description": "The ENTITLEMENT_API_KEY." }
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
                        "emailId": { "type": "string", "nullable": true, "description": "May be null (§15.3)." }
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
