//! Client of Microsoft's SaaS Fulfillment API v2 (being written).
