//! The Marketplace simulator (being written).
